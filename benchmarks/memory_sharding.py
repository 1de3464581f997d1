"""Per-process memory of parameters, gradients and AdamW state when `mot-train` runs with DDP and with FSDP, the
projection to N processes and to the paper's MoT-Medium and MoT-Base, and the communication volume per step of DDP,
FSDP and expert parallelism (see docs/training-at-scale.md).

A benchmark, not a test. Each strategy runs `mot-train`'s own code (`run_training`) for a few steps under
`torchrun --nproc_per_node 2` on CPU (gloo); FSDP is `--fsdp` with the defaults (one unit per `MoTGPTBlock`, full
shard). In every process, just before the first optimizer step, the bytes of the parameters and gradients that the
process holds are counted (for FSDP, the local shards: `DTensor.to_local()`), and just after it those of the optimizer
state; the process's peak resident memory is recorded too (it also holds activations, the data and the libraries).
The projection to N processes and to other models counts, from the parameter shapes, what FSDP2 keeps: every
parameter split on its first dimension into N chunks of ceil(rows / N) rows, 4 bytes (fp32) each for the parameter,
its gradient and AdamW's two moments.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_sharding.py            # mot-small, 2 processes, ~2 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_sharding.py --quick    # a tiny model, for a smoke run

Writes `--out` (JSON) and the same name with `.png`.
"""

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from common import RESULTS, machine_info, pyplot, write_json
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM
from mixture_of_tokens.presets import preset_config
from mixture_of_tokens.training import parse_args as parse_training_args
from mixture_of_tokens.training import run_training

STRATEGIES = {"ddp": [], "fsdp": ["--fsdp"]}
PROCESSES = 2
KINDS = ("parameters", "gradients", "optimizer_state")  # what each process counts
FP32_TRAINING_BYTES = 16  # per parameter: fp32 weight, gradient, and AdamW's exp_avg and exp_avg_sq
PROCESS_COUNTS = [1, 2, 4, 8, 16, 32, 64]
PAPER_SEQUENCE = 256
# The paper's backbones and their dense twins, with GPT-2's vocabulary and the paper's sequence length.
PAPER_MODELS = {
    name: dict(vocab_size=50257, n_positions=PAPER_SEQUENCE)
    for name in ("mot-medium", "dense-medium", "mot-base", "dense-base")
}
# (devices, groups of G sequences per device) of the communication estimates: the paper's batch of 256 sequences on
# 8 devices (one group each, the most devices it allows), 4 times that batch on 8 devices, and 32 devices.
COMMUNICATION_SETTINGS = [(8, 1), (8, 4), (32, 1)]
QUICK_MODEL = dict(n_layer=2, n_embd=64, n_head=2, n_experts=16, group_size=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mot-small", help="the model measured (a mot-train preset)")
    parser.add_argument("--batch_size", type=int, default=32, help="per-device batch (a multiple of group_size)")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--data_cache_dir", default=".cache/mot-data")
    parser.add_argument("--out", default=str(RESULTS / "memory_sharding.json"))
    parser.add_argument("--quick", action="store_true", help="a tiny MoT model and vocabulary, for a smoke run")
    args = parser.parse_args(argv)
    args.model = QUICK_MODEL if args.quick else {}
    if args.quick:
        args.vocab_size, args.block_size = 512, 32
    return args


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes these tensors occupy in this process: only the local shard of a DTensor."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


class StepMemory:
    """Counts this process's parameter and gradient bytes just before the first optimizer step, and its optimizer
    state bytes just after it (when all three exist at once: the peak of the three)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        register_optimizer_step_pre_hook(self.before)
        register_optimizer_step_post_hook(self.after)

    def before(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if "parameters" not in self.counts:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.counts["parameters"] = local_bytes(params)
            self.counts["gradients"] = local_bytes(p.grad for p in params if p.grad is not None)

    def after(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if "optimizer_state" not in self.counts:
            states = optimizer.state.values()
            self.counts["optimizer_state"] = local_bytes(t for s in states for t in s.values() if torch.is_tensor(t))


def worker(report_dir: str, train_argv: list[str]) -> None:
    """One process of a measured run: `run_training` as `mot-train` runs it, then this process's counts in
    `report_dir/rank{N}.json`."""
    memory = StepMemory()
    trainer = run_training(*parse_training_args(train_argv))
    model = trainer.model
    units = Counter(type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule))
    report = memory.counts | {
        "fsdp": trainer.is_fsdp_enabled,
        "world_size": trainer.args.world_size,
        "full_parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "fsdp_units": dict(units),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    path = Path(report_dir) / f"rank{trainer.args.process_index}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_arguments(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """`mot-train` arguments of a measured run: a few steps, no evaluation, no checkpoint."""
    model = ["--model", *(f"{key}={value}" for key, value in args.model.items())] if args.model else []
    return [
        "--preset", args.preset, *model, "--block_size", str(args.block_size),
        "--vocab_size", str(args.vocab_size), "--data_cache_dir", args.data_cache_dir,
        "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]  # fmt: skip


def measure(strategy: str, args: argparse.Namespace) -> list[dict]:
    """Run `strategy` over `PROCESSES` processes; the reports of every process, by rank."""
    with tempfile.TemporaryDirectory() as folder:
        reports = Path(folder) / "reports"
        reports.mkdir()
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", str(reports),
            *training_arguments(args, Path(folder) / "run"), *STRATEGIES[strategy],
        ]  # fmt: skip
        env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"the {strategy} run failed:\n{result.stderr[-5000:]}")
        return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(PROCESSES)]


def parameter_shapes(config: MoTGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every (untied) parameter's shape, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MoTGPTForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def count(shapes: dict[str, tuple[int, ...]], keep: Callable[[str], bool] = lambda name: True) -> int:
    """Number of parameters among `shapes` whose name `keep` accepts."""
    return sum(math.prod(shape) for name, shape in shapes.items() if keep(name))


def is_expert_weight(name: str) -> bool:
    return ".mlp.experts." in name  # a MoT layer's weights besides its router


def fsdp_bytes_per_process(shapes: dict[str, tuple[int, ...]], processes: int) -> int:
    """Parameter, gradient and AdamW bytes (fp32) of the first process when FSDP2 splits every parameter on its first
    dimension into `processes` chunks (the first chunks have ceil(rows / processes) rows)."""
    rows = sum(math.ceil(shape[0] / processes) * math.prod(shape[1:]) for shape in shapes.values())
    return FP32_TRAINING_BYTES * rows


def projection(config: MoTGPTConfig) -> dict:
    """Bytes per process of parameters, gradients and AdamW state under DDP and FSDP for each process count."""
    shapes = parameter_shapes(config)
    n_params = count(shapes)
    mot_layers = tuple(f"transformer.h.{index}.mlp." for index in config.mot_layer_indices)
    return {
        "parameters": n_params,
        "mot_layer_parameters": count(shapes, lambda name: name.startswith(mot_layers)),
        "processes": PROCESS_COUNTS,
        "ddp_bytes": [FP32_TRAINING_BYTES * n_params] * len(PROCESS_COUNTS),
        "fsdp_bytes": [fsdp_bytes_per_process(shapes, n) for n in PROCESS_COUNTS],
    }


def communication(config: MoTGPTConfig, processes: int, groups_per_device: int = 1) -> dict:
    """Bytes each device sends per optimizer step (bf16 mixed precision, as in the paper) under DDP, FSDP and expert
    parallelism, and the bytes of parameters, gradients and AdamW state it holds; see docs/training-at-scale.md.

    DDP: a ring all-reduce of the fp32 gradients, 2 (N - 1) / N * P * 4. FSDP (full shard): two all-gathers (forward,
    backward) and one reduce-scatter, 3 (N - 1) / N * P * b, with b = 2 under accelerate's bf16 policy (4 in fp32).
    Expert parallelism: the E experts of each MoT layer split over the N devices; per token, E / G mixtures of d
    values go to the experts' devices, their outputs come back, and the backward pass sends the gradients of both:
    4 all-to-alls of (N - 1) / N * T * (E / G) * d * 2 bytes per MoT layer, plus DDP's all-reduce for the weights
    that stay replicated (attention, embeddings, dense MLPs, controllers). T, the tokens per device, is
    `groups_per_device` groups of G sequences of the paper's 256 tokens (one group: the paper's batch of 256 on 8
    devices, the most devices that batch allows, each holding whole groups).
    """
    shapes = parameter_shapes(config)
    n_params, expert_params = count(shapes), count(shapes, is_expert_weight)
    mot_layers = len(config.mot_layer_indices)
    share = (processes - 1) / processes
    tokens_per_device = groups_per_device * config.group_size * PAPER_SEQUENCE
    mixtures_per_token = config.n_experts / config.group_size
    all_to_all = 4 * share * tokens_per_device * mixtures_per_token * config.n_embd * 2 * mot_layers
    ddp = 2 * share * n_params * 4
    # Tokens per device T at which the all-to-alls move as many bytes as DDP's all-reduce of the expert weights,
    # whatever N: 4 * T * (E / G) * d * 2 = 2 * (P_x / L) * 4.
    break_even = 2 * (expert_params / mot_layers) * 4 / (4 * mixtures_per_token * config.n_embd * 2)
    return {
        "processes": processes,
        "tokens_per_device": tokens_per_device,
        "experts": config.n_experts,
        "mixtures_per_token": mixtures_per_token,
        "ddp_bytes": ddp,
        "fsdp_bytes": 3 * share * n_params * 2,
        "fsdp_fp32_bytes": 3 * share * n_params * 4,
        "expert_parallel_bytes": all_to_all + 2 * share * (n_params - expert_params) * 4,
        "expert_parallel_all_to_all_bytes": all_to_all,
        "break_even_tokens_per_device": break_even,
        "ddp_memory_bytes": FP32_TRAINING_BYTES * n_params,
        "fsdp_memory_bytes": fsdp_bytes_per_process(shapes, processes),
        "expert_parallel_memory_bytes": FP32_TRAINING_BYTES * (n_params - expert_params + expert_params / processes),
    }


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, strategy in enumerate(("ddp", "fsdp")):
        for rank, report in enumerate(results["measured"][strategy]):
            x, bottom = index * 3 + rank, 0.0
            for color, kind in enumerate(KINDS):
                mb = report[kind] / 2**20
                left.bar(x, mb, bottom=bottom, color=f"C{color}", label=kind.replace("_", " ") if x == 0 else None)
                bottom += mb
    left.set_xticks([0, 1, 3, 4], ["DDP\nrank 0", "DDP\nrank 1", "FSDP\nrank 0", "FSDP\nrank 1"])
    left.set_ylabel("MiB per process")
    left.set_title(f"measured: {results['settings']['preset']}, 2 processes", fontsize=10)
    left.legend(fontsize=8)
    for color, (name, proj) in enumerate(results["projection"].items()):
        gb = [b / 1e9 for b in proj["fsdp_bytes"]]
        right.plot(proj["processes"], gb, marker="o", color=f"C{color}", label=f"{name} FSDP")
        right.axhline(proj["ddp_bytes"][0] / 1e9, color=f"C{color}", ls="--", lw=1, label=f"{name} DDP")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("processes")
    right.set_ylabel("GB per process (params + grads + AdamW, fp32)")
    right.set_title("projection", fontsize=10)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    measured = {strategy: measure(strategy, args) for strategy in STRATEGIES}
    ddp, fsdp = measured["ddp"], measured["fsdp"]
    ratio = {kind: max(r[kind] for r in fsdp) / max(r[kind] for r in ddp) for kind in KINDS}
    model_config = preset_config(args.preset, vocab_size=args.vocab_size, n_positions=args.block_size, **args.model)
    projections = {args.preset: projection(model_config)} | {
        name: projection(preset_config(name, **fields)) for name, fields in PAPER_MODELS.items()
    }
    paper_configs = {
        f"{name}/{experts}E": preset_config(name, n_experts=experts, **fields)
        for name, fields in PAPER_MODELS.items()
        if name.startswith("mot-")
        for experts in (32, 512)
    }
    results = {
        "benchmark": "per-process bytes of parameters, gradients and AdamW state, mot-train under DDP and FSDP",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_sharding.py" + " --quick" * args.quick,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model_parameters": projections[args.preset]["parameters"],
        "measured": measured,
        "fsdp_over_ddp": {kind: round(value, 4) for kind, value in ratio.items()},
        "projection": projections,
        "projection_check": {
            "measured_fsdp_bytes": [sum(report[kind] for kind in KINDS) for report in fsdp],
            "projected_fsdp_bytes": fsdp_bytes_per_process(parameter_shapes(model_config), PROCESSES),
        },
        "communication": {
            name: [communication(config, *setting) for setting in COMMUNICATION_SETTINGS]
            for name, config in paper_configs.items()
        },
        "machine": machine_info(),
    }
    out = Path(args.out)
    write_json(results, out)
    plot(results, out.with_suffix(".png"))
    for strategy, reports in measured.items():
        for rank, report in enumerate(reports):
            mb = {kind: report[kind] / 2**20 for kind in KINDS}
            print(f"[memory_sharding] {strategy} rank {rank}: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mb.items()))
    print("[memory_sharding] FSDP / DDP per process: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one process of a measured run, started by `measure`
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
