"""OpenAI-compatible HTTP server for MoTGPT that forms the MoT groups itself: `mot-serve CHECKPOINT`.

A MoT model's output for one row depends on the other rows of its group (`config.group_size` consecutive batch rows),
so the way a server batches requests is part of every answer. This one queues the requests and decodes them together
in batches made of whole groups, in one of two modes (`--grouping`):

- `isolated` (default): each prompt gets a group of its own, completed with `group_size - 1` filler rows (the
  checkpoint's filler bank, see `mixture_of_tokens.fillers`) that are fed their own text. Its answer depends only on
  its prompt, its parameters and its seed, never on other requests or on the load: greedy, it is the completion of
  `model.generate(prompt, group_fillers=bank)`.
- `shared`: the prompts admitted together fill groups among themselves; fillers complete only the last group. Up to
  `group_size` times fewer rows per request, but an answer depends on the requests that shared its group.

Models that need no groups (`config.uses_groups` False: dense, Token Choice, transition-tuned) are batched plainly.

The model lives in one worker thread, the [`Engine`]; the HTTP handlers hand it [`Job`]s (one per prompt) and read
its [`Event`]s back. Requests join the running batch as new groups (their prompts are run as a batch of their own, then
their cache is appended), and a group leaves the batch when its last request is done.
"""

import argparse
import asyncio
import json
import logging
import secrets
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from .fillers import check_filler_bank, load_filler_bank

logger = logging.getLogger("mot-serve")

GROUPINGS = ("isolated", "shared")
GROUPING_HEADER = "X-MoT-Grouping"
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def __init__(self, tokenizer, stop: tuple[str, ...]):
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
        tokenizer,
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
        fillers: `(n_rows, length)` filler bank; needed when `model.config.uses_groups`.
        grouping: `"isolated"` or `"shared"` (see the module docstring).
        max_batch_size: most requests (prompts) decoded at once; filler rows come on top.
        max_wait_ms: how long the first waiting request may wait for others before it is admitted anyway.
        max_queue: most requests waiting for admission; more are refused with [`QueueFull`].
    """

    def __init__(
        self,
        model,
        tokenizer,
        fillers: torch.LongTensor | None = None,
        grouping: str = "isolated",
        max_batch_size: int = 32,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
    ):
        if grouping not in GROUPINGS:
            raise ValueError(f"`grouping` must be one of {GROUPINGS}, got {grouping!r}.")
        config = model.config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.uses_groups = bool(getattr(config, "uses_groups", False))
        self.group_size = config.group_size if self.uses_groups else 1
        self.grouping = grouping if self.uses_groups else "none"
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.context_limit = config.n_positions
        self.fillers = None
        if self.uses_groups:
            if fillers is None:
                raise ValueError(
                    f"the model mixes groups of {self.group_size} rows and needs a filler bank to complete them: "
                    "give --fillers FILE or a checkpoint with group_fillers.json (mot-train saves one)."
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
    def _eos_ids(model, tokenizer) -> set[int]:
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
        output = self.model.base_model(
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


# --------------------------------------------------------------------------------------------------- HTTP layer


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self):
        from fastapi.responses import JSONResponse

        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers={"Retry-After": "1"} if self.status == 503 else None)


def _request_models():
    """The pydantic models of the request bodies (built on first use: pydantic comes with FastAPI)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Body(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")

        model: str
        max_tokens: int | None = Field(None, ge=0)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        n: int | None = None
        stream: bool | None = False
        stream_options: dict[str, bool] | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=-(2**63), lt=2**64)
        logit_bias: dict[str, float] | None = None
        router_temperature: float | None = Field(None, ge=0)
        user: str | None = None

    class CompletionBody(Body):
        prompt: str | list[str] | list[int] | list[list[int]]
        logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
        echo: bool | None = False

    class Message(BaseModel):
        model_config = ConfigDict(strict=True, extra="allow")

        role: str
        content: str | list[dict[str, Any]]

    class ChatBody(Body):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=0)

    return CompletionBody, ChatBody


# Fields of OpenAI's API this server does not implement, with the values that mean "not used".
UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
UNSUPPORTED_CHAT = UNSUPPORTED | {"logprobs": (None, False), "tools": (None, []), "response_format": (None,)}
UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of up to 4 strings",
    "content": "a string or a list of text parts",
}


def parse_body(raw: bytes, model_class, unsupported: dict[str, tuple]):
    """Validate a JSON request body; raise [`ApiError`] 400 naming the first bad field."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model_class.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, *validation_message(error.errors()[0])) from error
    for name, allowed in unsupported.items():
        if data.get(name, None) not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if body.n not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one completion per prompt), got {body.n}", "n")
    return body


def validation_message(error: dict) -> tuple[str, str]:
    """A message naming the field of one pydantic error (`messages[0].content`), and the top-level field."""
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in part:
            break  # pydantic's tag of a union member, not a field
        else:
            path += f".{part}" if path else part
    if error["type"] == "missing":
        return f"'{path}' is required", str(error["loc"][0])
    field_name = path.rsplit(".", 1)[-1].split("[")[0]
    hint = UNION_HINTS.get(field_name)
    problem = f"must be {hint}" if hint and error["type"].endswith("_type") else error["msg"]
    return f"invalid '{path}': {problem}", str(error["loc"][0])


class Server:
    """The request handling between HTTP and the [`Engine`]: validation, tokenization, responses."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self.completion_body, self.chat_body = _request_models()

    def sampling_params(self, body, max_tokens: int) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise ApiError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self.engine.vocab_size or not -100 <= value <= 100:
                raise ApiError(400, f"'logit_bias' maps token ids < {self.engine.vocab_size} to [-100, 100]",
                               "logit_bias")  # fmt: skip
            bias[int(key)] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=stop,
            seed=body.seed,
            logit_bias=bias,
            router_temperature=body.router_temperature,
        )

    def check_model(self, body) -> None:
        if body.model != self.model_name:
            raise ApiError(400, f"unknown model {body.model!r}: this server serves {self.model_name!r}", "model",
                           "model_not_found")  # fmt: skip

    def check_length(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        limit = self.engine.context_limit
        if not prompt_ids:
            raise ApiError(400, f"'{param}' must not be empty", param)
        if len(prompt_ids) + max_tokens > limit:
            too_long = len(prompt_ids) >= limit
            raise ApiError(
                400,
                f"this model takes at most {limit} tokens of prompt and answer together; '{param}' has "
                f"{len(prompt_ids)} tokens and 'max_tokens' is {max_tokens}",
                param if too_long else "max_tokens",
                "context_length_exceeded",
            )

    def prompts(self, prompt) -> list[tuple[list[int], str | None]]:
        """(token ids, text) of each prompt of a completion request (text None: given as token ids)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(token, int) for token in prompt):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "'prompt' must not be empty", "prompt")
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append((self.tokenizer(item)["input_ids"], item))
            elif all(0 <= token < self.engine.vocab_size for token in item):
                prompts.append((list(item), None))
            else:
                raise ApiError(400, f"'prompt' token ids must be in [0, {self.engine.vocab_size})", "prompt")
        return prompts

    def chat_prompt(self, body) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {self.model_name!r} has no chat template: use /v1/completions", "messages")
        messages = []
        for message in body.messages:
            content = message.content
            if not isinstance(content, str):
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            messages.append({"role": message.role, "content": content})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_jobs(self, raw: bytes) -> tuple[Any, list[Job], asyncio.Queue]:
        body = parse_body(raw, self.completion_body, UNSUPPORTED)
        self.check_model(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = self.sampling_params(body, max_tokens)
        params.logprobs, params.echo = body.logprobs, bool(body.echo)
        prompts = self.prompts(body.prompt)
        for ids, _ in prompts:
            self.check_length(ids, max_tokens, "prompt")
        events: asyncio.Queue = asyncio.Queue()
        jobs = [self._job(ids, params, events, index, text) for index, (ids, text) in enumerate(prompts)]
        return body, jobs, events

    def chat_jobs(self, raw: bytes) -> tuple[Any, list[Job], asyncio.Queue]:
        body = parse_body(raw, self.chat_body, UNSUPPORTED_CHAT)
        self.check_model(body)
        ids = self.chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(self.engine.context_limit - len(ids), 1)  # OpenAI's default: up to the context length
        self.check_length(ids, max_tokens, "messages")
        events: asyncio.Queue = asyncio.Queue()
        return body, [self._job(ids, self.sampling_params(body, max_tokens), events)], events

    def _job(self, ids, params: SamplingParams, events: asyncio.Queue, index: int = 0, text: str | None = None) -> Job:
        loop = asyncio.get_running_loop()
        return Job(ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), self.tokenizer,
                   index, text)  # fmt: skip

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.engine.submit(jobs)
        except QueueFull as error:
            raise ApiError(503, str(error), None, "queue_full") from error

    def envelope(self, object_type: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": object_type, "created": int(time.time()),
                "model": self.model_name, "mot_grouping": self.engine.grouping}  # fmt: skip


async def events_of(request, jobs: list[Job], queue: asyncio.Queue) -> AsyncIterator[Event]:
    """The jobs' events until each has finished. A client that disconnects cancels its jobs, which frees their rows
    at the engine's next step, and ends this stream."""

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for job in jobs:
            job.cancel()
            queue.put_nowait(Event(job.index, finish_reason="cancelled"))

    watcher = asyncio.create_task(cancel_on_disconnect())
    remaining = len(jobs)
    try:
        while remaining:
            event = await queue.get()
            remaining -= event.finish_reason is not None
            yield event
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancel()


def logprobs_json(tokens: list[TokenInfo]) -> dict:
    """OpenAI's legacy `logprobs` object: per token its text, logprob, top alternatives and offset in the answer."""
    offsets, start = [], 0
    for token in tokens:
        offsets.append(start)
        start += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
        "text_offset": offsets,
    }


def usage_json(finals: list[Event]) -> dict:
    prompt, completion = sum(e.prompt_tokens for e in finals), sum(e.completion_tokens for e in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def check_errors(finals) -> None:
    """Answer HTTP 500 if decoding any of the prompts failed."""
    for event in finals:
        if event.error is not None:
            raise ApiError(500, event.error, None, "decoding_failed")


def create_app(engine: Engine, model_name: str):
    """The FastAPI application around a (not yet started) engine; it starts and stops the engine with the app."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # Uvicorn calls this after the in-flight requests are answered; the engine still finishes anything queued.
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mot-serve", lifespan=lifespan)
    headers = {GROUPING_HEADER: engine.grouping}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return ApiError(error.status_code, str(error.detail)).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "grouping": engine.grouping, "running": engine.running, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "mixture-of-tokens",
                "mot_grouping": engine.grouping, "group_size": engine.group_size,
                "max_model_len": engine.context_limit}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, jobs, queue = server.completion_jobs(await request.body())
        server.submit(jobs)
        events = events_of(request, jobs, queue)
        if body.stream:
            return StreamingResponse(stream(events, body, completion_chunk), media_type="text/event-stream",
                                     headers=headers)  # fmt: skip
        texts, tokens, finals = defaultdict(str), defaultdict(list), {}
        async for event in events:
            texts[event.index] += event.text
            tokens[event.index] += event.tokens
            if event.finish_reason is not None:
                finals[event.index] = event
        check_errors(finals.values())
        choices = [
            {"index": i, "text": texts[i], "finish_reason": finals[i].finish_reason,
             "logprobs": logprobs_json(tokens[i]) if body.logprobs is not None else None,
             "mot_group_requests": finals[i].group_requests}
            for i in range(len(jobs))
        ]  # fmt: skip
        response = server.envelope("text_completion", "cmpl") | {"choices": choices}
        return JSONResponse(response | {"usage": usage_json(list(finals.values()))}, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, jobs, queue = server.chat_jobs(await request.body())
        server.submit(jobs)
        events = events_of(request, jobs, queue)
        if body.stream:
            return StreamingResponse(stream(events, body, chat_chunk), media_type="text/event-stream", headers=headers)
        text, final = "", None
        async for event in events:
            text += event.text
            final = event
        check_errors([final])
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": final.finish_reason, "logprobs": None,
                  "mot_group_requests": final.group_requests}  # fmt: skip
        response = server.envelope("chat.completion", "chatcmpl") | {"choices": [choice]}
        return JSONResponse(response | {"usage": usage_json([final])}, headers=headers)

    def completion_chunk(event: Event, body) -> dict:
        choice = {"index": event.index, "text": event.text, "finish_reason": event.finish_reason,
                  "logprobs": logprobs_json(event.tokens) if body.logprobs is not None else None}  # fmt: skip
        if event.finish_reason is not None:
            choice["mot_group_requests"] = event.group_requests
        return server.envelope("text_completion", "cmpl") | {"choices": [choice]}

    def chat_chunk(event: Event, body) -> dict:
        delta = {"content": event.text} if event.text else {}
        choice = {"index": 0, "delta": delta, "finish_reason": event.finish_reason, "logprobs": None}
        if event.finish_reason is not None:
            choice["mot_group_requests"] = event.group_requests
        return server.envelope("chat.completion.chunk", "chatcmpl") | {"choices": [choice]}

    async def stream(events: AsyncIterator[Event], body, make_chunk) -> AsyncIterator[str]:
        """Server-sent events: one chunk per event, an error object if decoding failed, usage if asked, [DONE]."""
        chat = make_chunk is chat_chunk
        kind, prefix = ("chat.completion.chunk", "chatcmpl") if chat else ("text_completion", "cmpl")
        if chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield f"data: {json.dumps(server.envelope(kind, prefix) | {'choices': [first]})}\n\n"
        finals = []
        async for event in events:
            if event.error is not None:
                yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
                continue
            if event.finish_reason is not None:
                finals.append(event)
            yield f"data: {json.dumps(make_chunk(event, body))}\n\n"
        if (body.stream_options or {}).get("include_usage"):
            last = server.envelope(kind, prefix) | {"choices": [], "usage": usage_json(finals)}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    return app


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mot-serve",
        description="OpenAI-compatible server for MoTGPT checkpoints that forms the MoT groups itself "
        "(docs/serving.md).",
    )
    parser.add_argument("checkpoint", help="model folder or Hub name (with its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default="isolated",
        help="isolated: each request in a group of its own, completed with fillers (answers independent of other "
        "requests); shared: requests admitted together share groups (more throughput, answers depend on them)",
    )
    parser.add_argument("--fillers", help="filler bank JSON file (default: the checkpoint's group_fillers.json)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="most requests decoded at once")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="how long a request waits for others")
    parser.add_argument("--max_queue", type=int, default=256, help="most waiting requests; more get HTTP 503")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="auto: as saved (float32 on CPU)")
    parser.add_argument("--served_model_name", help="the name clients pass as `model` (default: the folder name)")
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    for name in ("max_batch_size", "max_queue"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_wait_ms < 0:
        parser.error("--max_wait_ms must be >= 0")
    return args


def load_engine(args: argparse.Namespace) -> Engine:
    """Model, tokenizer and filler bank of the command line's checkpoint, in an [`Engine`]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[args.dtype]
    if dtype == "auto" and args.device == "cpu":
        dtype = torch.float32  # half precision is slow on CPU and not what the checkpoint was evaluated in
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    fillers = None
    if getattr(model.config, "uses_groups", False):
        try:
            fillers = load_filler_bank(args.fillers or args.checkpoint, model.config.group_size)
        except ValueError as error:
            raise ValueError(
                f"{args.checkpoint} mixes groups of {model.config.group_size} rows and needs a filler bank to complete "
                f"them in either grouping mode (give --fillers FILE): {error}"
            ) from error
    return Engine(model, tokenizer, fillers, args.grouping, args.max_batch_size, args.max_wait_ms, args.max_queue)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        engine = load_engine(args)
    except (OSError, ValueError) as error:
        raise SystemExit(f"mot-serve: error: {error}") from error
    name = args.served_model_name or Path(args.checkpoint.rstrip("/")).name
    logger.info(
        "serving %r: grouping %s, groups of %d rows, at most %d tokens per request",
        name, engine.grouping, engine.group_size, engine.context_limit,
    )  # fmt: skip
    # Uvicorn drains the requests in flight, then re-raises SIGTERM to the handler it found: make that a normal exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
