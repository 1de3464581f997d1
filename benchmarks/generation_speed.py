"""New tokens per second of batched greedy generation: MoTGPT against GPT-2 with the same attention stack and a
FLOP-matched MLP, side by side in one process.

    python benchmarks/generation_speed.py                 # batch 32, prompt 32, 128 new tokens, KV cache
    python benchmarks/generation_speed.py --quick         # a few seconds, for a smoke test

Writes benchmarks/results/generation_speed.json and .png.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_experts", type=int, default=32)
    parser.add_argument("--group_size", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", default=str(RESULTS / "generation_speed.json"))
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    shared = dict(
        vocab_size=args.vocab_size,
        n_positions=args.prompt_len + args.new_tokens,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=max(1, args.n_embd // 64),
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    mot = MoTGPTForCausalLM(MoTGPTConfig(n_experts=args.n_experts, group_size=args.group_size, **shared))
    # The dense twin: GPT-2's own model, its MLP as wide as the MoT layer's FLOP-matched width d_ff.
    dense = GPT2LMHeadModel(GPT2Config(n_inner=mot.config.d_ff, activation_function="relu", **shared))
    return {"motgpt": mot.eval(), "gpt2": dense.eval()}


@torch.no_grad()
def time_generation(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return elapsed


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(results["tokens_per_second"])
    ax.bar(names, [results["tokens_per_second"][n] for n in names], color=["C1", "C0"])
    ax.set_ylabel("new tokens / second")
    ax.set_title(f"batched greedy generation, ratio {results['ratio_motgpt_to_gpt2']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if args.quick:
        args.batch_size, args.prompt_len, args.new_tokens, args.n_embd, args.repeats = 8, 8, 8, 64, 1
        args.vocab_size, args.group_size, args.n_experts = 512, 8, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build_models(args)
    prompts = torch.randint(1, args.vocab_size, (args.batch_size, args.prompt_len))
    for model in models.values():  # warm-up
        time_generation(model, prompts, min(8, args.new_tokens))
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
        for name, model in models.items():
            times[name].append(time_generation(model, prompts, args.new_tokens))
    new_tokens = args.batch_size * args.new_tokens
    tokens_per_second = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    results = {
        "benchmark": "batched greedy generation with KV cache, fp32",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "d_ff": models["motgpt"].config.d_ff,
        "expert_size": models["motgpt"].config.expert_size_resolved,
        "seconds": times,
        "tokens_per_second": tokens_per_second,
        "ratio_motgpt_to_gpt2": tokens_per_second["motgpt"] / tokens_per_second["gpt2"],
        "machine": {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or "unknown"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps({k: results[k] for k in ("tokens_per_second", "ratio_motgpt_to_gpt2")}, indent=2))


if __name__ == "__main__":
    main()
