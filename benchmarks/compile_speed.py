"""Eager against `torch.compile`, side by side in one process: an expert layer's forward + backward, a model's
training step and greedy decoding, for MoT (with its filler bank), the dense twin and dropless Token Choice.

A benchmark, not a test. The models are the `mot-tiny` preset (4 blocks, d 128, groups of 16, 32 experts), its
dense twin and a dropless top-1 Token Choice model with 16 experts as wide as the dense MLP (the same expert FLOPs
per token); vocabulary 8192, dropout 0. Each candidate is compiled once before timing (the compile time is reported
apart); eager and compiled runs are interleaved, and the median of the per-round ratios is reported.

- layer: forward + backward of one expert layer (or the dense MLP) on 32 rows of 64 tokens; `torch.compile` with
  `fullgraph=True`.
- train: one AdamW step of the whole model on 32 rows of 64 tokens (`torch.compile(model)`, as Trainer's
  `torch_compile` does).
- decode: new tokens per second of `generate` (prompt 16, 32 new tokens), eager with the dynamic cache against a
  static cache with the forward compiled (`fullgraph=True`), for 1 prompt (MoT: one group, completed by 15 filler
  rows) and 128 prompts (8 groups).
- serve: the same prompts through `mot-serve`'s engine (isolated groups), eager against `--compile` (decode steps
  compiled with dynamic shapes, on the dynamic cache).

    python benchmarks/compile_speed.py            # about 10 minutes on 2 CPU cores, much of it compiling
    python benchmarks/compile_speed.py --quick    # tiny sizes, a smoke test
    python benchmarks/compile_speed.py --device cuda

Writes benchmarks/results/compile_speed.json and .png; `--stages` measures some stages again and keeps the others'
rows (and the machine each stage ran on) from the file.
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import (
    RESULTS,
    build_layers,
    fullgraph_compile_config,
    interleaved_times,
    machine_info,
    make_layer_step,
    make_step,
    median_ratio,
    pyplot,
    write_json,
)

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.data import gpt2_tokenizer
from mixture_of_tokens.presets import preset_config
from mixture_of_tokens.serving.engine import Engine, Job, SamplingParams

MODELS = {
    "mot": ("mot-tiny", {}),
    "dense": ("dense-tiny", {}),
    "token_choice": ("mot-tiny", {"ffn_type": "token_choice", "n_experts": 16, "capacity_factor": None}),
}
SIZES = {"batch": 32, "seq_len": 64, "vocab_size": 8192, "prompt_len": 16, "new_tokens": 32, "prompts": [1, 128]}
QUICK_SIZES = {"batch": 4, "seq_len": 8, "vocab_size": 64, "prompt_len": 4, "new_tokens": 4, "prompts": [1, 4]}
QUICK_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_experts": 4, "group_size": 2}


def build_model(name: str, sizes: dict, quick: bool, device: str) -> MoTGPTForCausalLM:
    preset, overrides = MODELS[name]
    overrides = overrides | (QUICK_MODEL if quick else {})
    if quick and name == "token_choice":
        overrides["n_experts"] = 2
    positions = max(sizes["seq_len"], sizes["prompt_len"] + sizes["new_tokens"])
    config = preset_config(preset, vocab_size=sizes["vocab_size"], n_positions=positions, **overrides)
    torch.manual_seed(0)
    model = MoTGPTForCausalLM(config).to(device)
    if config.uses_groups:
        bank = torch.randint(2, config.vocab_size, (config.group_size - 1, config.n_positions))
        model.set_group_fillers(bank)
    return model


def compare(steps: dict[str, Callable[[], object]], device: str, repeats: int, same_output: bool = False) -> dict:
    """Time the steps ("eager", "compiled" and any other) after a first call of the compiled one (the compile, from a
    clean compiler cache, so that no earlier candidate's graphs count against its recompile limit): the compile
    seconds, each step's median, and the median per-round speed-up of the compiled step over "eager" (`speedup`)
    and over each other step (`speedup_over_NAME`). With `same_output`, every step's output must equal the compiled
    one's."""
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled_output = steps["compiled"]()
    compile_s = time.perf_counter() - start
    if same_output:
        for name, step in steps.items():
            assert torch.equal(step(), compiled_output), f"{name} and compiled decoding gave other tokens"
    times, discarded = interleaved_times(steps, device, repeats, warmup=1)
    row = {"compile_s": round(compile_s, 1)}
    row |= {f"{name}_ms": round(statistics.median(t), 2) for name, t in times.items()}
    for name in steps.keys() - {"compiled"}:
        key = "speedup" if name == "eager" else f"speedup_over_{name}"
        row[key] = round(1 / median_ratio(times["compiled"], times[name]), 3)
    return row | {"discarded_rounds": discarded}


def tokens_per_second(row: dict, new_tokens: int) -> dict:
    """Each timed step's new tokens per second, from its median milliseconds."""
    return {key.replace("_ms", "_tokens_per_s"): round(1000 * new_tokens / ms, 1) for key, ms in row.items()
            if key.endswith("_ms")}  # fmt: skip


def layer_rows(sizes: dict, quick: bool, device: str, repeats: int) -> list[dict]:
    d, n_experts, group_size = (32, 4, 2) if quick else (128, 32, 16)
    x = torch.randn(sizes["batch"], sizes["seq_len"], d, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    layers = build_layers(d, n_experts, group_size, ("mot", "token_choice"))
    rows = []
    for name, layer in layers.items():
        layer.to(device)
        steps = {
            "eager": make_layer_step(layer, x, grad),
            "compiled": make_layer_step(torch.compile(layer, fullgraph=True), x, grad),
        }
        rows.append({"stage": "layer", "model": name} | compare(steps, device, repeats))
        print(rows[-1], flush=True)
    return rows


def train_rows(sizes: dict, quick: bool, device: str, repeats: int) -> list[dict]:
    ids = torch.randint(0, sizes["vocab_size"], (sizes["batch"], sizes["seq_len"]), device=device)
    rows = []
    for name in MODELS:
        eager, compiled = build_model(name, sizes, quick, device), build_model(name, sizes, quick, device)
        compiled_call = torch.compile(compiled)
        steps = {
            "eager": make_step(eager.train(), torch.optim.AdamW(eager.parameters(), lr=1e-4), ids),
            "compiled": make_step(compiled_call.train(), torch.optim.AdamW(compiled.parameters(), lr=1e-4), ids),
        }
        rows.append({"stage": "train", "model": name} | compare(steps, device, repeats))
        print(rows[-1], flush=True)
    return rows


def decode_rows(sizes: dict, quick: bool, device: str, repeats: int) -> list[dict]:
    """`generate`: eager with the dynamic cache (what a user runs by default), eager with a static cache, and the
    static cache with the forward compiled, so that the cache's share of the speed-up shows apart."""
    settings = dict(
        max_new_tokens=sizes["new_tokens"], min_new_tokens=sizes["new_tokens"], do_sample=False, pad_token_id=1
    )
    rows = []
    for name in MODELS:
        model = build_model(name, sizes, quick, device).eval()
        for n_prompts in sizes["prompts"]:
            prompts = torch.randint(2, sizes["vocab_size"], (n_prompts, sizes["prompt_len"]), device=device)
            static = partial(model.generate, prompts, cache_implementation="static", **settings)
            steps = {
                "eager": partial(model.generate, prompts, **settings),
                "static": partial(static, disable_compile=True),  # a GPU would compile it by itself
                "compiled": partial(static, compile_config=fullgraph_compile_config()),
            }
            row = {"stage": "decode", "model": name, "prompts": n_prompts} | compare(steps, device, repeats, True)
            rows.append(row | tokens_per_second(row, n_prompts * sizes["new_tokens"]))
            print(rows[-1], flush=True)
    return rows


def serve_wave(engine: Engine, tokenizer, prompts: list[list[int]], new_tokens: int) -> None:
    """Submit `prompts` to the running engine and wait until each has its `new_tokens` greedy tokens (the models'
    EOS id lies outside their vocabulary, so none stops early)."""
    finished = threading.Semaphore(0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    engine.submit([Job(prompt, params, lambda event: event.finish_reason and finished.release(), tokenizer)
                   for prompt in prompts])  # fmt: skip
    for _ in prompts:
        assert finished.acquire(timeout=600), "the engine did not answer"


def serve_rows(sizes: dict, quick: bool, device: str, repeats: int) -> list[dict]:
    """`mot-serve`'s engine (isolated groups: each prompt with the filler bank), eager against `--compile`."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = gpt2_tokenizer(folder)  # decodes every id of the models' vocabularies
    rows = []
    for name in ("mot", "dense"):
        model = build_model(name, sizes, quick, device).eval()
        engines = {
            key: Engine(model, tokenizer, max_wait_ms=0, compile=key == "compiled") for key in ("eager", "compiled")
        }
        for engine in engines.values():
            engine.start()
        try:
            for n_prompts in sizes["prompts"]:
                prompts = torch.randint(2, sizes["vocab_size"], (n_prompts, sizes["prompt_len"])).tolist()
                steps = {key: partial(serve_wave, engine, tokenizer, prompts, sizes["new_tokens"])
                         for key, engine in engines.items()}  # fmt: skip
                row = {"stage": "serve", "model": name, "prompts": n_prompts} | compare(steps, device, repeats)
                rows.append(row | tokens_per_second(row, n_prompts * sizes["new_tokens"]))
                print(rows[-1], flush=True)
        finally:
            for engine in engines.values():
                engine.stop()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    labels = [f"{r['stage']}\n{r['model']}" + (f"\n{r['prompts']} prompts" if "prompts" in r else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speed-up of torch.compile over eager")
    ax.set_title("torch.compile against eager (median per-round ratio)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = {"layer": layer_rows, "train": train_rows, "decode": decode_rows, "serve": serve_rows}
    parser.add_argument("--stages", nargs="+", choices=list(stages), default=list(stages))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, repeats = (QUICK_SIZES, 2) if args.quick else (SIZES, args.repeats)
    # The stages not run this time keep their rows and machine from an earlier file of the same sizes, so that one
    # stage can be measured again alone.
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
    if earlier.get("sizes") != json.loads(json.dumps(sizes)):
        earlier = {}
    machines = {stage: info for stage, info in earlier.get("machine", {}).items() if stage not in args.stages}
    rows = [row for row in earlier.get("results", []) if row["stage"] not in args.stages]
    for stage in args.stages:
        machines[stage] = machine_info()
        rows += stages[stage](sizes, args.quick, args.device, repeats)
    order = list(stages)
    rows.sort(key=lambda row: order.index(row["stage"]))  # stable: each stage's rows in their own order
    results = {"machine": machines, "sizes": sizes, "models": MODELS, "results": rows}
    write_json(results, args.out)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and its .png chart")
    return results


if __name__ == "__main__":
    main()
