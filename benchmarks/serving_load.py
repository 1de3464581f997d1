"""Serving benchmark: `mot-serve` in both grouping modes against one request at a time with `generate`.

N concurrent clients each send M completion requests, one after the other (prompts: the first tokens of held-out
State of the Union blocks; greedy; EOS banned so that every answer is `--max_tokens` long):

- to a `mot-serve` subprocess on localhost, once with `--grouping isolated` and once with `--grouping shared`;
- to one-request-at-a-time serving: a worker thread in this process that answers the queued requests one by one
  with `model.generate(prompt)` (a group of one, no fillers; no HTTP, which only favours it).

Reported per mode: requests/s, new tokens/s, p50 and p99 latency (client side, queueing included), and the perplexity
of what the mode serves on held-out blocks: the servers score each block with `echo` + `logprobs` and `max_tokens=0`
(sent by the N clients at once, so the shared server groups them as it would real traffic), the one-at-a-time
baseline scores each block alone. For reference, the perplexity of the same blocks in full groups of consecutive
blocks, as in training, is given too.

    .venv/bin/python benchmarks/serving_load.py            # trains a small MoT model first (runs/serving-mot, reused)
    .venv/bin/python benchmarks/serving_load.py --checkpoint runs/mot-tiny --clients 16 --requests 4
    .venv/bin/python benchmarks/serving_load.py --quick    # a tiny random model, a few requests: a smoke test

Writes benchmarks/results/serving.json and .png.
"""

import argparse
import json
import math
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from common import RESULTS, ROOT, machine_info, pyplot, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM
from mixture_of_tokens.data import load_sotu, pack, train_bpe_tokenizer
from mixture_of_tokens.evaluation import block_nll
from mixture_of_tokens.fillers import build_filler_bank
from mixture_of_tokens.modeling_mot import save_filler_bank
from mixture_of_tokens.run_log import train_or_reuse
from mixture_of_tokens.training import parse_args as training_args
from mixture_of_tokens.training import run_training

MODEL_NAME = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a MoTGPT checkpoint with a filler bank (default: train one)")
    parser.add_argument("--runs_dir", default="runs", help="where the trained model goes (reused when finished)")
    parser.add_argument("--max_steps", type=int, default=300, help="training steps of the model trained here")
    parser.add_argument("--block_size", type=int, default=64, help="its sequence length (= filler length)")
    parser.add_argument("--clients", type=int, default=16, help="N concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="M requests per client")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--ppl_blocks", type=int, default=128, help="held-out blocks scored in each mode")
    parser.add_argument("--max_batch_size", type=int, default=32, help="the servers' --max_batch_size")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="the servers' --max_wait_ms")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the baseline")
    parser.add_argument("--timeout", type=float, default=600, help="seconds any one mode may take")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 clients x 2 requests")
    parser.add_argument("--out", default=str(RESULTS / "serving.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.prompt_tokens, args.max_tokens, args.ppl_blocks = 2, 2, 8, 8, 4
        args.block_size = 32
    if args.prompt_tokens + args.max_tokens > args.block_size:
        parser.error("--prompt_tokens + --max_tokens must be <= --block_size (the fillers' length)")
    return args


def quick_checkpoint(folder: Path, block_size: int) -> Path:
    """A tiny random MoTGPT, a BPE trained on two speeches and a filler bank of their blocks."""
    tokenizer = train_bpe_tokenizer(load_sotu()["train"]["text"][:2], vocab_size=300)
    config = MoTGPTConfig(vocab_size=len(tokenizer), n_positions=block_size, n_layer=1, n_embd=32, n_head=2,
                          n_experts=4, group_size=4, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    MoTGPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    blocks = pack(load_sotu()["train"].select(range(2)), tokenizer, block_size)["input_ids"]
    save_filler_bank(build_filler_bank(blocks, config.group_size - 1, tokenizer.eos_token_id), folder, 4)
    return folder


def trained_checkpoint(args: argparse.Namespace) -> Path:
    """The preset `mot-tiny` (4 layers, d 128, 32 experts, groups of 16) trained on the speeches; mot-train saves
    its filler bank. A finished run in the folder is reused."""
    output_dir = Path(args.runs_dir) / "serving-mot"
    argv = ["--preset", "mot-tiny", "--output_dir", str(output_dir), "--max_steps", str(args.max_steps)]
    argv += ["--block_size", str(args.block_size), "--learning_rate", "2e-3", "--eval_strategy", "no"]
    argv += ["--save_steps", "100", "--logging_steps", "25", "--disable_tqdm", "true"]
    train_or_reuse(*training_args(argv), run=run_training)
    return output_dir


def held_out_blocks(tokenizer: PreTrainedTokenizerBase, block_size: int, n_blocks: int) -> list[list[int]]:
    """The first `n_blocks` blocks of the held-out speeches (a single short speech in quick mode)."""
    validation = load_sotu()["validation"]
    blocks = pack(validation.select(range(1)) if n_blocks < 16 else validation, tokenizer, block_size)
    return blocks["input_ids"][:n_blocks]


class ServerProcess:
    """`mot-serve CHECKPOINT` on a free localhost port, as a subprocess, stopped with SIGTERM on exit."""

    def __init__(self, checkpoint: Path, grouping: str, args: argparse.Namespace) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "mixture_of_tokens.serving", str(checkpoint), "--port", str(port)]
        command += ["--grouping", grouping, "--served_model_name", MODEL_NAME, "--log_level", "warning"]
        command += ["--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms)]
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(command, env=env, cwd=ROOT)

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mot-serve exited with status {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("mot-serve did not become ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_clients(
    send: Callable[[list[int]], tuple[int, int]], prompts: list[list[int]], args: argparse.Namespace
) -> dict:
    """N clients, each sending its M prompts one after the other through `send` (which returns the number of new
    tokens and of requests in the answer's group): throughput and latency of the whole run."""
    per_client = [prompts[i :: args.clients] for i in range(args.clients)]
    latencies, tokens, groups = [], [], []

    def client(own: list[list[int]]) -> None:
        for prompt in own:
            start = time.perf_counter()
            new_tokens, group_requests = send(prompt)
            latencies.append(time.perf_counter() - start)
            tokens.append(new_tokens)
            groups.append(group_requests)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client, own) for own in per_client]:
            future.result(timeout=args.timeout)
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "new_tokens_per_s": sum(tokens) / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
        "mean_requests_per_group": statistics.mean(groups),
    }


def server_mode(
    url: str, prompts: list[list[int]], blocks: list[list[int]], eos: int, args: argparse.Namespace
) -> dict:
    """Throughput and latency of a running server, then the perplexity it serves on `blocks`."""
    client = httpx.Client(timeout=args.timeout, limits=httpx.Limits(max_connections=args.clients))

    def send(prompt: list[int]) -> tuple[int, int]:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "logit_bias": {str(eos): -100}}  # fmt: skip
        response = client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        answer = response.json()
        return answer["usage"]["completion_tokens"], answer["choices"][0]["mot_group_requests"]

    def score(block: list[int]) -> tuple[float, int]:
        body = {"model": MODEL_NAME, "prompt": block, "max_tokens": 0, "echo": True, "logprobs": 0}
        response = client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return -sum(choice["logprobs"]["token_logprobs"][1:]), choice["mot_group_requests"]

    send(prompts[0])  # warm-up
    result = run_clients(send, prompts, args)
    with ThreadPoolExecutor(args.clients) as pool:
        scored = list(pool.map(score, blocks))
    result["perplexity"] = math.exp(sum(nll for nll, _ in scored) / (len(blocks) * (len(blocks[0]) - 1)))
    result["scoring_mean_requests_per_group"] = statistics.mean(group for _, group in scored)
    client.close()
    return result


def one_at_a_time(
    model: MoTGPTForCausalLM, prompts: list[list[int]], blocks: list[list[int]], eos: int, args: argparse.Namespace
) -> dict:
    """The same clients against a worker that answers one request at a time with `model.generate`."""
    jobs: queue.Queue = queue.Queue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            prompt, future = job
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, do_sample=False,
                                 suppress_tokens=[eos])  # fmt: skip
            future.set_result((out.shape[1] - len(prompt), 1))

    def send(prompt: list[int]) -> tuple[int, int]:
        future = Future()
        jobs.put((prompt, future))
        return future.result()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    send(prompts[0])  # warm-up
    result = run_clients(send, prompts, args)
    jobs.put(None)
    thread.join()
    with torch.no_grad():
        nll = sum(float(block_nll(model, torch.tensor([block]))) for block in blocks)
    result["perplexity"] = math.exp(nll / (len(blocks) * (len(blocks[0]) - 1)))
    result["scoring_mean_requests_per_group"] = 1
    return result


def full_group_perplexity(model: MoTGPTForCausalLM, blocks: list[list[int]]) -> float:
    """Perplexity of the blocks in groups of `group_size` consecutive blocks, as the model was trained."""
    size, ids = model.config.group_size, torch.tensor(blocks)
    with torch.no_grad():
        nll = sum(float(block_nll(model, ids[i : i + size]).sum()) for i in range(0, len(ids), size))
    return math.exp(nll / (ids.numel() - len(ids)))


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    modes = list(results["modes"])
    names = {"isolated": "isolated", "shared": "shared", "one_at_a_time": "one at a time\n(generate)"}
    colors = [f"C{i}" for i in range(len(modes))]
    panels = [
        ("requests_per_s", "requests / s"),
        ("new_tokens_per_s", "new tokens / s"),
        ("p50_latency_s", "p50 latency (s)"),
        ("p99_latency_s", "p99 latency (s)"),
        ("perplexity", "perplexity served (held-out)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = [results["modes"][mode][key] for mode in modes]
        ax.bar(range(len(modes)), values, color=colors)
        for i, value in enumerate(values):
            ax.annotate(f"{value:.0f}" if value >= 100 else f"{value:.3g}", (i, value), ha="center", va="bottom",
                        fontsize=8)  # fmt: skip
        if key == "perplexity":
            ax.axhline(results["perplexity_full_groups"], color="gray", lw=1, ls="--", label="full groups")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(range(len(modes)), [names[m] for m in modes], fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    s = results["settings"]
    fig.suptitle(f"{s['clients']} clients x {s['requests']} requests, {s['prompt_tokens']} + {s['max_tokens']} tokens, "
                 f"groups of {results['group_size']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        elif args.quick:
            checkpoint = quick_checkpoint(Path(scratch), args.block_size)
        else:
            checkpoint = trained_checkpoint(args)
        results = run(checkpoint, args)
    results["command"] = " ".join(["python benchmarks/serving_load.py", *(sys.argv[1:] if argv is None else argv)])
    write_json(results, out)
    plot(results, out.with_suffix(".png"))
    return results


def run(checkpoint: Path, args: argparse.Namespace) -> dict:
    """Every mode on the same prompts and held-out blocks."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    eos = tokenizer.eos_token_id
    blocks = held_out_blocks(tokenizer, args.block_size, max(args.ppl_blocks, args.clients * args.requests))
    prompts = [block[: args.prompt_tokens] for block in blocks[: args.clients * args.requests]]
    blocks = blocks[: args.ppl_blocks]
    modes = {}
    for grouping in ("isolated", "shared"):
        with ServerProcess(checkpoint, grouping, args) as server:
            modes[grouping] = server_mode(server.url, prompts, blocks, eos, args)
        print(f"{grouping}: {json.dumps(modes[grouping])}")
    modes["one_at_a_time"] = one_at_a_time(model, prompts, blocks, eos, args)
    print(f"one_at_a_time: {json.dumps(modes['one_at_a_time'])}")
    return {
        "benchmark": "mot-serve (isolated, shared) against one-request-at-a-time generate, greedy, fp32, localhost",
        "checkpoint": str(checkpoint),
        "group_size": model.config.group_size,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint", "runs_dir")},
        "modes": modes,
        "perplexity_full_groups": full_group_perplexity(model, blocks),
        "machine": machine_info() | {"cores": os.cpu_count()},
    }


if __name__ == "__main__":
    main()
