"""The model's side of `mot-serve`: the [`Engine`] worker thread that queues [`Job`]s, admits them into the running
batch as whole groups, decodes them with per-row sampling and retires a group when its last job is done.

It knows nothing of HTTP (no FastAPI, no pydantic): whatever hands it jobs reads their [`Event`]s back through each
job's `sink`. The grouping modes are described in `mixture_of_tokens.serving`.
"""

import logging
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from ..modeling_mot import check_filler_bank

logger = logging.getLogger("mot-serve")

GROUPINGS = ("isolated", "shared")


@dataclass
class SamplingParams:
    """What one prompt asks for. `temperature=0` is greedy; `logprobs` is the number of top alternatives to report
    per token (None: no logprobs); `router_temperature` is the MoT mixing temperature (None: the model's)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    echo: bool = False
    router_temperature: float | None = None


@dataclass
class TokenInfo:
    """One token of an answer with its log-probability under the model (None for the first prompt token) and the
    `logprobs` most likely tokens at that position."""

    text: str
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class Event:
    """What the engine reports about one prompt (`index` in its request): new text, and at the end the reason it
    finished ("stop", "length", "error"; "cancelled" when its client left) with the token counts and the number of
    requests in its group."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    group_requests: int = 1
    error: str | None = None


class TextStream:
    """Turns a growing list of token ids into text deltas, cut at the first stop string. Text that could be the
    start of a stop string, or an incomplete UTF-8 character, is held back until the next tokens decide."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return the text that is now safe to send and whether a stop string was reached."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(stop) for stop in self.stop) if i >= 0]
        if found:
            return self._advance(text, min(found)), True
        if text.endswith("\ufffd"):
            return "", False
        held = max((k for stop in self.stop for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._advance(text, len(text) - held), False

    def flush(self) -> str:
        """The text held back, at the end of the answer."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _advance(self, text: str, end: int | None) -> str:
        delta = text[self.sent : end]
        self.sent = max(self.sent, len(text) if end is None else end)
        return delta


class Job:
    """One prompt of a request as the engine decodes it. `sink` receives its [`Event`]s (the handler passes a
    thread-safe hand-over to its event loop); `cancel` makes the engine drop it at its next step."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        tokenizer: PreTrainedTokenizerBase,
        index: int = 0,
        prompt_text: str | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.index = index
        self.tokenizer = tokenizer
        self.prompt_text = prompt_text
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.text = TextStream(tokenizer, params.stop)
        self.n_generated = 0
        self.group_requests = 1
        self.cancelled = False
        self.finished = False
        self.arrival = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, text: str = "", tokens: list[TokenInfo] | None = None, finish_reason: str | None = None) -> None:
        """Send new text (and its tokens' logprobs); the event with a `finish_reason` is the job's last."""
        if self.finished or (not text and not tokens and finish_reason is None):
            return
        self.finished = finish_reason is not None
        event = Event(self.index, text, tokens or [], finish_reason, prompt_tokens=len(self.prompt_ids),
                      completion_tokens=self.n_generated, group_requests=self.group_requests)  # fmt: skip
        self.sink(event)

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.sink(Event(self.index, finish_reason="error", error=message))

    def echo(self, prompt_logprobs: list[TokenInfo] | None) -> None:
        """Send the prompt back first (OpenAI's `echo`), with its tokens' logprobs when asked for."""
        text = self.prompt_text if self.prompt_text is not None else self.tokenizer.decode(self.prompt_ids)
        self.emit(text, prompt_logprobs)

    def add_token(self, token_id: int, info: TokenInfo | None, eos_ids: set[int]) -> bool:
        """Record one new token and send what it adds; return whether the answer is finished."""
        self.n_generated += 1
        if token_id in eos_ids:
            self.emit(self.text.flush(), finish_reason="stop")
            return True
        text, stopped = self.text.push(token_id)
        tokens = [info] if info is not None else None
        if stopped:
            self.emit(text, tokens, "stop")
        elif self.n_generated >= self.params.max_tokens:
            self.emit(text + self.text.flush(), tokens, "length")
        else:
            self.emit(text, tokens)
        return self.finished


@dataclass
class Row:
    """One batch row: a job's prompt, or a filler's first tokens followed by the rest of its text (`forced`)."""

    prompt: list[int]
    job: Job | None = None
    forced: Iterator[int] | None = None
    done: bool = False


@dataclass
class Batch:
    """Rows decoded together (whole groups of `Engine.group_size` consecutive rows), their KV cache and the 2-D
    padding mask `(n_rows, n_columns)`: 1 for real tokens, 0 for left padding and for the tokens fed to a row that is
    done (which takes it out of its group's mixtures). `next_ids` are the tokens each row is fed next."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor
    next_ids: list[int]
    router_temperature: float | None


class QueueFull(Exception):
    """The engine's queue cannot take a request now (full, or shutting down)."""


class Engine:
    """The model's worker thread: queues jobs, admits them as whole groups into the running batch (one batch per
    router temperature, as a forward pass takes one), and decodes with per-row sampling.

    Args:
        model: a causal LM whose base model takes the 2-D `attention_mask` and `position_ids` (MoTGPT does).
        tokenizer: its tokenizer.
        fillers: `(n_rows, length)` filler bank; default: the model's (`model.group_fillers`). Needed when
            `model.config.uses_groups`.
        grouping: `"isolated"` or `"shared"` (see `mixture_of_tokens.serving`).
        max_batch_size: most requests (prompts) decoded at once; filler rows come on top.
        max_wait_ms: how long the first waiting request may wait for others before it is admitted anyway.
        max_queue: most requests waiting for admission; more are refused with [`QueueFull`].
        compile: run the decode steps' forward through `torch.compile` with dynamic shapes (rows, cache length and
            mask width change from step to step); prompt passes stay eager. The first steps of each new shape class
            compile (seconds to a minute), later ones run faster (benchmarks/compile_speed.py).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        fillers: torch.LongTensor | None = None,
        grouping: str = "isolated",
        max_batch_size: int = 32,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        compile: bool = False,
    ):
        if grouping not in GROUPINGS:
            raise ValueError(f"`grouping` must be one of {GROUPINGS}, got {grouping!r}.")
        config = model.config
        self.model = model.eval()
        self.decode_model = torch.compile(model.base_model, dynamic=True) if compile else model.base_model
        self.tokenizer = tokenizer
        self.uses_groups = bool(getattr(config, "uses_groups", False))
        self.group_size = config.group_size if self.uses_groups else 1
        self.grouping = grouping if self.uses_groups else "none"
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.context_limit = config.n_positions
        self.fillers = None
        if self.uses_groups:
            fillers = getattr(model, "group_fillers", None) if fillers is None else fillers  # default: the model's
            if fillers is None:
                raise ValueError(
                    f"the model mixes groups of {self.group_size} rows and needs a filler bank to complete them: add "
                    "one to its checkpoint with `mot-fillers`, or give --fillers FILE."
                )
            check_filler_bank(fillers, self.group_size)
            if self.eos_ids & set(fillers.flatten().tolist()):
                raise ValueError(f"the filler bank holds an EOS id ({sorted(self.eos_ids)}); a filler must not stop.")
            self.fillers = fillers.tolist()
            # An isolated group's fillers are fed prompt and answer positions of their own text.
            self.context_limit = min(self.context_limit, fillers.shape[1])
        self.pad_id = next(i for i in (tokenizer.pad_token_id, config.pad_token_id, *self.eos_ids, 0) if i is not None)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.running = 0
        self._waiting: deque[Job] = deque()
        self._batches: dict[float | None, Batch] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
        return set(torch.as_tensor(eos).flatten().tolist()) if eos is not None else set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mot-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every job accepted so far, then end the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all `jobs` (one request's prompts) or none: raise [`QueueFull`] when they do not fit."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.extend(jobs)
            self._cond.notify()

    def _run(self) -> None:
        with torch.inference_mode():
            while (wave := self._next_wave()) is not None:
                by_temperature = defaultdict(list)
                for job in wave:
                    by_temperature[job.params.router_temperature].append(job)
                for router_temperature, jobs in by_temperature.items():
                    self._guarded(jobs, self._admit, jobs, router_temperature)
                for router_temperature, batch in list(self._batches.items()):
                    jobs = [row.job for row in batch.rows if row.job is not None]
                    if not self._guarded(jobs, self._step, batch) or not batch.rows:
                        del self._batches[router_temperature]
                self.running = sum(1 for b in self._batches.values() for row in b.rows if row.job and not row.done)

    def _guarded(self, jobs: list[Job], work: Callable, *args) -> bool:
        """Run `work(*args)`; if the model fails, fail `jobs` (the caller drops their batch) rather than the server."""
        try:
            work(*args)
            return True
        except Exception as error:
            logger.exception("decoding failed")
            for job in jobs:
                job.fail(f"decoding failed: {type(error).__name__}: {error}")
            return False

    def _next_wave(self) -> list[Job] | None:
        """The jobs to admit now (possibly none, when batches are running), or None once closed and drained."""
        with self._cond:
            while True:
                if any(job.cancelled for job in self._waiting):
                    self._waiting = deque(job for job in self._waiting if not job.cancelled)
                room = self.max_batch_size - self.running
                if self._waiting and room > 0:
                    age = time.monotonic() - self._waiting[0].arrival
                    if len(self._waiting) >= room or age >= self.max_wait or self._closing:
                        wave = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                        self.running += len(wave)  # counted before their first event is sent
                        return wave
                    if not self._batches:
                        self._cond.wait(self.max_wait - age)
                        continue
                if self._batches:
                    return []
                if self._closing:
                    return None
                self._cond.wait()

    def _groups(self, jobs: list[Job]) -> list[list[Row]]:
        """Cut the admitted jobs into groups: one per job (isolated), or consecutive jobs of similar length (shared);
        each completed to `group_size` rows with fillers."""
        if not self.uses_groups:
            return [[Row(job.prompt_ids, job)] for job in jobs]
        if self.grouping == "isolated":
            return [self._complete([job]) for job in jobs]
        jobs = sorted(jobs, key=lambda job: len(job.prompt_ids))
        return [self._complete(jobs[i : i + self.group_size]) for i in range(0, len(jobs), self.group_size)]

    def _complete(self, jobs: list[Job]) -> list[Row]:
        """One group: the jobs' rows, then filler rows whose text starts at the same column as the longest prompt
        (as `generate(..., group_fillers=...)` aligns them) and continues one token per step."""
        length = max(len(job.prompt_ids) for job in jobs)
        for job in jobs:
            job.group_requests = len(jobs)
        fillers = [Row(f[:length], forced=iter(f[length:])) for f in self.fillers[: self.group_size - len(jobs)]]
        return [Row(job.prompt_ids, job) for job in jobs] + fillers

    def _admit(self, jobs: list[Job], router_temperature: float | None) -> None:
        """Run the prompts of `jobs` as a batch of their own, then append it to the running batch of their router
        temperature. Every row is left-padded to the longest prompt: positions come from the mask, so a group's
        inputs are the same whatever it is batched with."""
        rows = [row for group in self._groups(jobs) for row in group]
        width = max(len(row.prompt) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        device = self.model.device
        batch = Batch(rows, DynamicCache(config=self.model.config), mask.to(device), [], router_temperature)
        hidden = self._forward(batch, ids.to(device))
        batch.next_ids = [self.pad_id] * len(rows)
        self._sample(batch, hidden, prefill=True)
        self._retire(batch)
        if batch.rows:
            running = self._batches.get(router_temperature)
            self._batches[router_temperature] = batch if running is None else merge_batches(running, batch)

    def _step(self, batch: Batch) -> None:
        """One decode step: feed each row its next token (a done row's is masked), then sample and retire."""
        live = torch.tensor([not row.done for row in batch.rows], dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, live[:, None]], dim=1)
        hidden = self._forward(batch, torch.tensor(batch.next_ids, device=batch.mask.device)[:, None])
        self._sample(batch, hidden)
        self._retire(batch)

    def _forward(self, batch: Batch, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states `(n_rows, n_new, n_embd)` of `input_ids` `(n_rows, n_new)`, the cache and mask updated."""
        position_ids = (batch.mask.cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1] :]
        kwargs = {} if batch.router_temperature is None else {"router_temperature": batch.router_temperature}
        model = self.decode_model if input_ids.shape[1] == 1 else self.model.base_model
        output = model(
            input_ids=input_ids,
            attention_mask=batch.mask,
            position_ids=position_ids,
            past_key_values=batch.cache,
            use_cache=True,
            **kwargs,
        )
        return output.last_hidden_state

    def _sample(self, batch: Batch, hidden: torch.Tensor, prefill: bool = False) -> None:
        """Choose every running row's next token: sampled for jobs (from their own logits, generator and
        parameters), the next token of their text for fillers. Only the jobs' rows go through the LM head."""
        active = [i for i, row in enumerate(batch.rows) if row.job is not None and not row.done]
        logits = self.model.get_output_embeddings()(hidden[active, -1]).float().cpu() if active else []
        for i, row_logits in zip(active, logits, strict=True):
            row, job = batch.rows[i], batch.rows[i].job
            if job.cancelled:
                row.done = True
                continue
            if prefill and job.params.echo:
                job.echo(self._prompt_logprobs(job, hidden[i]) if job.params.logprobs is not None else None)
            if job.params.max_tokens == 0:
                job.emit(finish_reason="length")
                row.done = True
                continue
            token_id = choose_token(row_logits, job.params, job.generator)
            info = self._token_info(token_id, row_logits, job.params.logprobs)
            row.done = job.add_token(token_id, info, self.eos_ids)
            batch.next_ids[i] = token_id
        for i, row in enumerate(batch.rows):
            if row.forced is not None and not row.done:
                token_id = next(row.forced, None)
                # A filler whose text has run out (shared mode: a longer prompt than its own group's) leaves.
                row.done = token_id is None
                batch.next_ids[i] = self.pad_id if token_id is None else token_id

    def _token_info(self, token_id: int, logits: torch.Tensor, logprobs: int | None) -> TokenInfo | None:
        if logprobs is None:
            return None
        logp = torch.log_softmax(logits, dim=-1)
        return TokenInfo(self.tokenizer.decode([token_id]), float(logp[token_id]), self._top(logp, logprobs))

    def _top(self, logp: torch.Tensor, k: int) -> dict[str, float]:
        values, ids = logp.topk(k)
        return {self.tokenizer.decode([i]): float(v) for v, i in zip(values.tolist(), ids.tolist(), strict=True)}

    def _prompt_logprobs(self, job: Job, hidden: torch.Tensor) -> list[TokenInfo]:
        """Log-probabilities of the prompt's tokens, each given the ones before it, from the row's prefill states."""
        n = len(job.prompt_ids)
        logp = torch.log_softmax(self.model.get_output_embeddings()(hidden[-n:-1]).float().cpu(), dim=-1)
        texts = [self.tokenizer.decode([i]) for i in job.prompt_ids]
        infos = [TokenInfo(texts[0], None, None)]
        for position, token_id in enumerate(job.prompt_ids[1:]):
            top = self._top(logp[position], job.params.logprobs)
            infos.append(TokenInfo(texts[position + 1], float(logp[position, token_id]), top))
        return infos

    def _retire(self, batch: Batch) -> None:
        """Drop the groups whose jobs are all done, and the leading columns no remaining row uses."""
        size = self.group_size
        starts = range(0, len(batch.rows), size)
        keep = [s for s in starts if any(row.job and not row.done for row in batch.rows[s : s + size])]
        if len(keep) == len(starts):
            return
        index = [i for start in keep for i in range(start, start + size)]
        batch.rows = [batch.rows[i] for i in index]
        batch.next_ids = [batch.next_ids[i] for i in index]
        if not index:
            return
        mask = batch.mask[index]
        first = int(mask.any(dim=0).int().argmax())
        batch.mask = mask[:, first:]
        rows = torch.tensor(index, device=mask.device)
        batch.cache = DynamicCache(
            [(layer.keys[rows, :, first:], layer.values[rows, :, first:]) for layer in batch.cache.layers]
        )


def merge_batches(a: Batch, b: Batch) -> Batch:
    """Batch `b`'s rows after `a`'s: the shorter one is left-padded (masked columns, zero keys and values)."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        return torch.nn.functional.pad(tensor, (0, 0) * (-dim - 1) + (missing, 0)) if missing else tensor

    cache = DynamicCache(
        [
            (torch.cat([pad(la.keys, -2), pad(lb.keys, -2)]), torch.cat([pad(la.values, -2), pad(lb.values, -2)]))
            for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)
        ]
    )
    mask = torch.cat([pad(a.mask, -1), pad(b.mask, -1)])
    return Batch(a.rows + b.rows, cache, mask, a.next_ids + b.next_ids, a.router_temperature)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row's logits `(vocab,)`: greedy at temperature 0, else sampled from the softmax at
    `temperature`, restricted to the smallest set of most likely tokens whose probability reaches `top_p`."""
    if params.logit_bias:
        logits = logits.clone()
        logits[list(params.logit_bias)] += torch.tensor(list(params.logit_bias.values()))
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # the first token is always kept
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
