"""`mot-serve` as users run it: a subprocess on a free localhost port, serving tiny checkpoints, driven over HTTP and
through the `openai` client. Isolation is checked as exact equality of greedy (and seeded) text alone and under load."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from torch._dynamo.utils import counters

from mixture_of_tokens import MoTGPTForCausalLM, serving
from mixture_of_tokens.modeling_mot import load_filler_bank, save_filler_bank
from mixture_of_tokens.serving import cli

ROOT = Path(__file__).resolve().parents[1]
N_POSITIONS = 256
GROUP_SIZE = 3
# Token ids 0-2 are EOS, padding and unknown: banned, every answer runs to max_tokens and decodes to words.
BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}
PROMPTS = ["the nation of people", "we are", "they", "this is the people of the nation and we are", "a", "it was"]


def save_checkpoint(folder: Path, fillers: bool = True, chat: bool = True, **overrides) -> Path:
    """A tiny MoTGPT (vocabulary = the tiny tokenizer's words) with its tokenizer and, if asked, a filler bank."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = MoTGPTForCausalLM(tiny_config(vocab_size=len(tokenizer), **({"n_positions": N_POSITIONS} | overrides)))
    model.save_pretrained(folder)
    if chat:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}and"
    tokenizer.save_pretrained(folder)
    if fillers:
        generator = torch.Generator().manual_seed(1)
        save_filler_bank(torch.randint(3, len(tokenizer), (GROUP_SIZE - 1, N_POSITIONS), generator=generator), folder,
                         GROUP_SIZE)  # fmt: skip
    return folder


class ServerProcess:
    """`python -m mixture_of_tokens.serving CHECKPOINT --port P ...`, its output in a log file."""

    def __init__(self, checkpoint: Path, log: Path, *args: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "mixture_of_tokens.serving", str(checkpoint), "--port", str(self.port), *args]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet: poll again until the deadline
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def post(self, path: str = "/v1/completions", **body) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json={"model": "tiny", **body}, timeout=60)

    def complete(self, **body) -> dict:
        response = self.post(**body)
        assert response.status_code == 200, response.text
        return response.json()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The servers decode while this process computes references: a tiny model gains nothing from more threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    return {
        "mot": save_checkpoint(root / "tiny"),
        "mot_no_bank": save_checkpoint(root / "no-bank", fillers=False),
        "dense": save_checkpoint(root / "dense", fillers=False, chat=False, mot_layers=[], n_positions=1024),
    }


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """Every server of this module and the quick benchmark, started at once (they load in parallel) and always
    killed at the end."""
    logs = tmp_path_factory.mktemp("logs")
    bank = checkpoints["mot"] / "group_fillers.json"
    name = ["--served_model_name", "tiny"]
    specs = {
        "isolated": (checkpoints["mot"], *name, "--max_batch_size", "8"),
        "shared": (checkpoints["mot_no_bank"], *name, "--grouping", "shared", "--fillers", str(bank),
                   "--max_wait_ms", "300"),
        # Small limits, for the queue and shutdown tests (the plain batching test needs only 2 rows at once).
        "dense": (checkpoints["dense"], *name, "--max_batch_size", "2", "--max_queue", "2", "--max_wait_ms", "0"),
    }  # fmt: skip
    started = {key: ServerProcess(spec[0], logs / f"{key}.log", *spec[1:]) for key, spec in specs.items()}
    out = logs / "serving.json"
    with open(logs / "benchmark.log", "w") as log:
        # A session of its own: killing its process group also kills the servers it starts.
        benchmark = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "serving_load.py"), "--quick", "--threads", "1",
             "--out", str(out)],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"}, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield started | {"benchmark": (benchmark, out)}
    finally:
        for server in started.values():
            server.close()
        if benchmark.poll() is None:
            os.killpg(benchmark.pid, signal.SIGKILL)
        benchmark.wait(timeout=30)


@pytest.fixture(scope="module")
def isolated(servers) -> ServerProcess:
    return servers["isolated"].wait_ready()


@pytest.fixture(scope="module")
def shared(servers) -> ServerProcess:
    return servers["shared"].wait_ready()


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The checkpoint's model, tokenizer and filler bank in this process, for `generate` references."""
    from transformers import AutoTokenizer

    model = MoTGPTForCausalLM.from_pretrained(checkpoints["mot"]).eval()
    return model, AutoTokenizer.from_pretrained(checkpoints["mot"]), load_filler_bank(checkpoints["mot"], GROUP_SIZE)


def generate_reference(reference, prompt: str, max_tokens: int) -> str:
    """What `model.generate` with the checkpoint's fillers answers, greedy, special tokens suppressed."""
    model, tokenizer, fillers = reference
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=max_tokens, do_sample=False, group_fillers=fillers, suppress_tokens=[0, 1, 2]
    )
    return tokenizer.decode(out[0, ids.shape[1] :])


def greedy(server: ServerProcess, prompt, max_tokens: int = 12, **extra) -> str:
    body = server.complete(prompt=prompt, max_tokens=max_tokens, temperature=0, logit_bias=BAN_SPECIAL, **extra)
    return body["choices"][0]["text"]


def hammer(server: ServerProcess, stop: threading.Event) -> int:
    """Other users' traffic until `stop`: other prompts, lengths, sampling, router temperatures and prompt lists.
    Returns the number of requests answered."""
    bodies = [
        dict(prompt="we are the people", max_tokens=30, temperature=1.0, seed=5),
        dict(prompt=["a nation", "they are", "it"], max_tokens=8, temperature=0.7, top_p=0.9),
        dict(prompt="of the nation", max_tokens=20, temperature=0, router_temperature=0.5),
        dict(prompt="the " * 40, max_tokens=3, stream=True),
    ]
    answered = 0
    while not stop.is_set():
        answered += server.post(**bodies[answered % len(bodies)]).status_code == 200
    return answered


@pytest.fixture
def load(isolated):
    """Four clients hammering the isolated server while a test runs; at the end, each must have been answered."""
    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer, isolated, stop) for _ in range(4)]
        time.sleep(0.3)
        yield
        stop.set()
        assert all(future.result() > 0 for future in futures)


def test_health_and_models(isolated):
    assert isolated.health() == {"status": "ok", "grouping": "isolated", "running": 0, "waiting": 0}
    client = openai.OpenAI(base_url=f"{isolated.url}/v1", api_key="unused", max_retries=0)
    (card,) = client.models.list().data
    assert card.id == "tiny"
    assert card.model_extra["mot_grouping"] == "isolated"
    assert card.model_extra["group_size"] == GROUP_SIZE
    assert card.model_extra["max_model_len"] == N_POSITIONS


def test_openai_client_gets_what_generate_gives_alone(isolated, reference):
    client = openai.OpenAI(base_url=f"{isolated.url}/v1", api_key="unused", max_retries=0)
    for prompt in PROMPTS[:3]:
        completion = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, logit_bias=BAN_SPECIAL
        )
        assert completion.choices[0].text == generate_reference(reference, prompt, 12)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 12
        assert completion.model_extra["mot_grouping"] == "isolated"


def test_isolated_answers_do_not_change_under_load(isolated, reference, load):
    """The same prompts give the same greedy text alone and while other clients hammer the server, sent all at once,
    and each is still what `generate` with the fillers gives."""
    alone = {p: generate_reference(reference, p, 12) for p in PROMPTS}
    client = openai.OpenAI(base_url=f"{isolated.url}/v1", api_key="unused", max_retries=0)

    def ask(prompt: str) -> str:
        completion = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, logit_bias=BAN_SPECIAL
        )
        return completion.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = dict(zip(PROMPTS, pool.map(ask, PROMPTS), strict=True))
    assert concurrent == alone


def test_seeded_sampling_is_the_same_alone_and_under_load(isolated, request):
    seeded = dict(prompt="the nation", temperature=0.9, top_p=0.95, seed=11, max_tokens=10, logit_bias=BAN_SPECIAL)
    alone = isolated.complete(**seeded)["choices"][0]["text"]
    request.getfixturevalue("load")
    under_load = [isolated.complete(**seeded)["choices"][0]["text"] for _ in range(3)]
    assert under_load == [alone] * 3
    assert isolated.complete(**(seeded | {"seed": 12}))["choices"][0]["text"] != alone


def test_prompt_lists_and_token_prompts(isolated, reference):
    body = isolated.complete(prompt=PROMPTS[:3], max_tokens=12, temperature=0, logit_bias=BAN_SPECIAL)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [generate_reference(reference, p, 12) for p in PROMPTS[:3]]
    assert body["usage"]["completion_tokens"] == 36
    ids = reference[1](PROMPTS[0])["input_ids"]
    assert greedy(isolated, ids) == body["choices"][0]["text"]


def test_streaming_gives_the_same_text(isolated):
    expected = greedy(isolated, PROMPTS[0], 20)
    client = openai.OpenAI(base_url=f"{isolated.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, logit_bias=BAN_SPECIAL, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    with httpx.stream("POST", f"{isolated.url}/v1/completions", json={"model": "tiny", "prompt": "a", "stream": True},
                      timeout=30) as response:  # fmt: skip
        assert response.headers["x-mot-grouping"] == "isolated"
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_strings_end_the_answer(isolated):
    text = greedy(isolated, PROMPTS[1], 12)
    words = text.split()
    stop_word = words[3]
    body = isolated.complete(prompt=PROMPTS[1], max_tokens=12, temperature=0, logit_bias=BAN_SPECIAL,
                             stop=[stop_word, "never said"])  # fmt: skip
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == text[: text.index(stop_word)]
    streamed = "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in httpx.post(f"{isolated.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "logit_bias": BAN_SPECIAL,
            "stop": stop_word, "stream": True}).text.splitlines()
        if line.startswith("data: {")
    )  # fmt: skip
    assert streamed == body["choices"][0]["text"]


@pytest.mark.parametrize("router_temperature", [None, 0.0])
def test_echo_logprobs_score_the_prompt_in_its_filler_group(isolated, reference, router_temperature):
    """`echo` + `logprobs` with `max_tokens=0` (how lm-eval scores text through an API) gives the log-probabilities
    of the prompt in a group with the fillers, as the model computes them, at the request's router temperature."""
    model, tokenizer, fillers = reference
    prompt = PROMPTS[3]
    extra = {} if router_temperature is None else {"router_temperature": router_temperature}
    body = isolated.complete(prompt=prompt, max_tokens=0, echo=True, logprobs=1, **extra)
    choice = body["choices"][0]
    assert choice["text"] == prompt
    ids = torch.tensor(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(torch.cat([ids[None], fillers[: GROUP_SIZE - 1, : len(ids)]]), **extra).logits[0]
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
    served = choice["logprobs"]["token_logprobs"]
    assert served[0] is None
    assert torch.allclose(torch.tensor(served[1:]), expected, atol=1e-5)
    assert choice["logprobs"]["tokens"] == prompt.split()
    assert [len(top) for top in choice["logprobs"]["top_logprobs"][1:]] == [1] * (len(ids) - 1)


def test_router_temperature_is_per_request(isolated, reference):
    model, tokenizer, fillers = reference
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, group_fillers=fillers, suppress_tokens=[0, 1, 2],
                         router_temperature=0.0)  # fmt: skip
    with ThreadPoolExecutor(2) as pool:  # two temperatures at once: two batches, stepped in turn
        discrete, default = pool.map(
            lambda extra: greedy(isolated, PROMPTS[0], **extra), [{"router_temperature": 0}, {}]
        )
    assert discrete == tokenizer.decode(out[0, ids.shape[1] :])
    assert default == generate_reference(reference, PROMPTS[0], 12)


def test_chat_completions(isolated):
    messages = [{"role": "user", "content": "we are the people"}]
    client = openai.OpenAI(base_url=f"{isolated.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          logit_bias=BAN_SPECIAL)  # fmt: skip
    # The tiny chat template joins the contents and appends "and": the same prompt as a completion.
    assert chat.choices[0].message.content == greedy(isolated, "we are the people and", 6)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            logit_bias=BAN_SPECIAL, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"model": "tiny", "prompt": "a"', None),  # malformed JSON
        ("[1, 2]", None),
        ('{"prompt": "a"}', "model"),
        ('{"model": "tiny", "prompt": "a", "max_tokens": "5"}', "max_tokens"),
        ('{"model": "tiny", "prompt": "a", "temperature": 3}', "temperature"),
        ('{"model": "tiny", "prompt": "a", "top_p": 0}', "top_p"),
        ('{"model": "tiny", "prompt": 3}', "prompt"),
        ('{"model": "tiny", "prompt": ""}', "prompt"),
        ('{"model": "tiny", "prompt": [5, 1000]}', "prompt"),
        ('{"model": "tiny", "prompt": "' + "the " * 300 + '"}', "prompt"),
        ('{"model": "tiny", "prompt": "a", "max_tokens": 256}', "max_tokens"),
        ('{"model": "tiny", "prompt": "a", "n": 2}', "n"),
        ('{"model": "gpt-4", "prompt": "a"}', "model"),
        ('{"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        ('{"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}', "logit_bias"),
        ('{"model": "tiny", "prompt": "a", "best_of": 3}', "best_of"),
        ('{"model": "tiny", "prompt": "a", "router_temperature": -1}', "router_temperature"),
        ('{"model": "tiny", "prompt": "a", "stream": "yes"}', "stream"),
    ],
)
def test_bad_requests_get_400_naming_the_field(isolated, body, param):
    response = httpx.post(f"{isolated.url}/v1/completions", content=body, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param is not None:
        assert param in error["message"]


def test_bad_chat_requests(isolated, servers):
    response = isolated.post("/v1/chat/completions", messages=[{"role": "user", "content": 3}])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert "messages[0].content" in response.json()["error"]["message"]
    response = isolated.post("/v1/chat/completions", messages=[])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    dense = servers["dense"].wait_ready()
    response = dense.post("/v1/chat/completions", messages=[{"role": "user", "content": "a"}])
    assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnecting_client_frees_its_row_and_disturbs_no_one(isolated, reference):
    long = {"model": "tiny", "prompt": "we are", "max_tokens": 240, "logit_bias": BAN_SPECIAL}
    expected = generate_reference(reference, PROMPTS[0], 200)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(greedy, isolated, PROMPTS[0], 200)
        with httpx.stream("POST", f"{isolated.url}/v1/completions", json=long | {"stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)  # the answer is running
            assert isolated.health()["running"] >= 1
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{isolated.url}/v1/completions", json=long, timeout=0.3)
        assert other.result() == expected
    wait_until(lambda: isolated.health()["running"] == 0 and isolated.health()["waiting"] == 0)


def test_shared_mode_fills_groups_with_requests(shared, isolated):
    prompts = PROMPTS[:4]
    body = shared.complete(prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    assert body["mot_grouping"] == "shared"
    # Admitted together: sorted by length, the three shortest prompts share a group, the longest gets fillers.
    longest = max(range(4), key=lambda i: len(prompts[i].split()))
    assert [c["mot_group_requests"] for c in body["choices"]] == [1 if i == longest else 3 for i in range(4)]
    alone = isolated.complete(prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    for index in range(4):
        assert body["choices"][index]["text"] == prompts[index]  # never another request's text
        grouped = body["choices"][index]["logprobs"]["token_logprobs"]
        assert len(grouped) == len(prompts[index].split())
        if index != longest and len(grouped) > 1:  # its answer depends on who shared its group
            assert grouped != alone["choices"][index]["logprobs"]["token_logprobs"]


def test_shared_mode_answers_each_request_its_own(shared):
    """Concurrent requests sharing groups each get their own prompt back and their own number of tokens."""
    cases = [(p, n) for p, n in zip(PROMPTS, range(3, 9), strict=True)]

    def ask(case):
        prompt, max_tokens = case
        response = shared.post(prompt=prompt, max_tokens=max_tokens, echo=True, logit_bias=BAN_SPECIAL)
        return response.headers["x-mot-grouping"], response.json()

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(ask, cases))
    assert any(body["choices"][0]["mot_group_requests"] > 1 for _, body in results)
    for (prompt, max_tokens), (header, body) in zip(cases, results, strict=True):
        assert header == "shared"
        assert body["choices"][0]["text"].startswith(prompt)
        assert body["usage"]["completion_tokens"] == max_tokens


def test_models_without_groups_are_batched_plainly(servers, checkpoints):
    dense = servers["dense"].wait_ready()
    assert dense.health()["grouping"] == "none"
    model = MoTGPTForCausalLM.from_pretrained(checkpoints["dense"]).eval()
    tokenizer = tiny_tokenizer()
    expected = []
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=10, do_sample=False, suppress_tokens=[0, 1, 2])
        expected.append(tokenizer.decode(out[0, ids.shape[1] :]))
    # Two prompts of one request are admitted together: one batch of two rows, each answered as if alone.
    body = dense.complete(prompt=PROMPTS[:2], max_tokens=10, temperature=0, logit_bias=BAN_SPECIAL)
    assert [choice["text"] for choice in body["choices"]] == expected
    assert body["mot_grouping"] == "none"


def test_a_failing_batch_fails_its_requests_and_the_engine_goes_on(reference):
    model, tokenizer, fillers = reference
    engine = serving.Engine(model, tokenizer, fillers, max_wait_ms=0)
    events = {"before": [], "after": []}
    done = threading.Semaphore(0)

    def job(name: str) -> serving.Job:
        params = serving.SamplingParams(max_tokens=3, temperature=0)
        return serving.Job([5, 6], params, lambda event: (events[name].append(event), done.release()), tokenizer)

    def broken(*args):
        raise RuntimeError("out of memory")

    engine._forward = broken
    engine.start()
    try:
        engine.submit([job("before")])
        assert done.acquire(timeout=30)
        del engine._forward  # the model works again
        engine.submit([job("after")])
        while not events["after"] or events["after"][-1].finish_reason is None:
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    assert events["before"][-1].finish_reason == "error" and "out of memory" in events["before"][-1].error
    assert events["after"][-1].finish_reason in ("stop", "length")


def greedy_engine_answers(engine: serving.Engine, tokenizer, waves: list[list[list[int]]]) -> list[str]:
    """The greedy answers (6 tokens) of the engine to each prompt, the waves of prompts submitted one after another."""
    events: list[list] = []
    done = threading.Semaphore(0)

    def sink(index: int):
        return lambda event: (events[index].append(event), done.release())

    engine.start()
    try:
        for wave in waves:
            params = serving.SamplingParams(max_tokens=6, temperature=0)
            jobs = [serving.Job(prompt, params, sink(len(events) + i), tokenizer) for i, prompt in enumerate(wave)]
            events.extend([] for _ in wave)
            engine.submit(jobs)
            while any(not got or got[-1].finish_reason is None for got in events):
                assert done.acquire(timeout=120)
    finally:
        engine.stop()
    return ["".join(event.text for event in got) for got in events]


def test_a_compiled_engine_gives_the_eager_engine_s_tokens(reference):
    """`mot-serve --compile`: decode steps through `torch.compile` (dynamic shapes) give the same greedy answers, for
    two waves of different sizes (new shapes: recompiled or reused, never wrong)."""
    model, tokenizer, fillers = reference
    waves = [[[5, 6, 7]], [[8, 9], [10, 11, 12, 13]]]
    eager = greedy_engine_answers(serving.Engine(model, tokenizer, fillers, max_wait_ms=0), tokenizer, waves)
    compiled = serving.Engine(model, tokenizer, fillers, max_wait_ms=0, compile=True)
    counters.clear()
    assert greedy_engine_answers(compiled, tokenizer, waves) == eager
    assert all(eager)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled


def test_a_grouped_model_without_filler_bank_does_not_start(checkpoints):
    with pytest.raises(SystemExit, match=r"needs a filler bank .*--fillers FILE"):
        cli.main([str(checkpoints["mot_no_bank"])])


LONG = {"model": "tiny", "prompt": "we are", "max_tokens": 500, "logit_bias": BAN_SPECIAL, "temperature": 0}


def open_streams(server: ServerProcess, stack: ExitStack, n: int) -> list:
    """`n` long streaming requests, each running (its first line read); their line iterators, kept open."""
    streams = []
    for _ in range(n):
        response = stack.enter_context(
            httpx.stream("POST", f"{server.url}/v1/completions", json=LONG | {"stream": True}, timeout=60)
        )
        lines = response.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)
        streams.append(lines)
    return streams


def finish_reasons(lines) -> list[str | None]:
    return [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines if line.startswith("data: {")]


def test_full_queue_gets_503_and_loses_nothing_accepted(servers):
    server = servers["dense"].wait_ready()
    with ThreadPoolExecutor(2) as pool, ExitStack() as stack:
        streams = open_streams(server, stack, 2)  # both batch rows are busy: what follows waits in the queue
        queued = [pool.submit(server.complete, **LONG) for _ in range(2)]
        wait_until(lambda: server.health()["waiting"] == 2)
        refused = server.post(prompt="a")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"
        assert [finish_reasons(lines)[-1] for lines in streams] == ["length", "length"]
        assert [future.result()["usage"]["completion_tokens"] for future in queued] == [500, 500]


def test_sigterm_finishes_requests_in_flight_and_exits(servers):
    server = servers["dense"].wait_ready()
    with ThreadPoolExecutor(1) as pool, ExitStack() as stack:
        streams = open_streams(server, stack, 2)
        queued = pool.submit(server.complete, **(LONG | {"max_tokens": 50}))
        wait_until(lambda: server.health()["waiting"] == 1)
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(server.url))  # stops taking requests...
        assert [finish_reasons(lines)[-1] for lines in streams] == ["length", "length"]  # ...finishes those running
        assert queued.result()["usage"]["completion_tokens"] == 50  # ...and the one it had queued
    assert server.process.wait(timeout=30) == 0


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except (httpx.ConnectError, httpx.RemoteProtocolError):  # refused, or closed unanswered while shutting down
        return True
    return False


def test_serving_benchmark_quick_mode(servers):
    """`benchmarks/serving_load.py --quick`, started with the servers, measured every mode and wrote JSON and PNG."""
    process, out = servers["benchmark"]
    assert process.wait(timeout=300) == 0, (out.parent / "benchmark.log").read_text()[-3000:]
    results = json.loads(out.read_text())
    assert set(results["modes"]) == {"isolated", "shared", "one_at_a_time"}
    for mode in results["modes"].values():
        assert mode["requests"] == 4 and mode["requests_per_s"] > 0 and mode["p99_latency_s"] >= mode["p50_latency_s"]
        assert mode["perplexity"] > 1
    assert results["modes"]["isolated"]["mean_requests_per_group"] == 1
    assert results["modes"]["shared"]["scoring_mean_requests_per_group"] >= 1
    assert out.with_suffix(".png").stat().st_size > 0
