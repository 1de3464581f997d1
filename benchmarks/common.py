"""What the benchmarks share: machine info, interleaved timing, JSON and charts, the quality benchmark's model variants.

Each benchmark is a script (`python benchmarks/NAME.py`) that imports the package and this module, which the script's
folder on `sys.path` makes importable (tests put `benchmarks/` on it), and no other benchmark, but for
`token_choice_drops`, which measures the quality benchmark's own run. Importing this module also puts the repository
root on `sys.path`, so that the scripts run from a checkout where the package is not installed.
"""

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from transformers import CompileConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM  # noqa: E402
from mixture_of_tokens.modeling_mot import EXPERT_LAYERS, ExpertChoiceLayer  # noqa: E402
from mixture_of_tokens.presets import preset_config, recipe_fields  # noqa: E402

RESULTS = Path(__file__).parent / "results"


# Machine and timing


def machine_info() -> dict[str, object]:
    """The software and hardware a benchmark ran on, and the machine's load, for its results file."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other processes on the machine make timings noisy
    }


def other_cpu_seconds() -> float:
    """CPU seconds used so far by all processes but this one (Linux; 0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return 0.0
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK") - own.user - own.system


def timed(step: Callable[[], None], device: str) -> float:
    """Milliseconds of one call of `step` (on CUDA, synchronized before and after)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def interleaved_times(
    steps: dict[str, Callable[[], None]], device: str, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], int]:
    """Milliseconds of each step over `repeats` rounds after `warmup`, all steps run once per round in alternating
    order, so drifts of the machine hit them alike. A round during which other processes used the CPU is redone
    (up to 3 * repeats times). Returns the times and the number of rounds redone."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    done = discarded = 0
    while done < warmup + repeats:
        order = list(steps) if done % 2 == 0 else list(reversed(steps))
        other, wall = other_cpu_seconds(), time.perf_counter()
        round_ms = {name: timed(steps[name], device) for name in order}
        other, wall = other_cpu_seconds() - other, time.perf_counter() - wall
        if done >= warmup and other > 0.1 * wall + 0.02 and discarded < 3 * repeats:
            discarded += 1  # other processes took CPU time during this round: redo it
            continue
        if done >= warmup:
            for name, ms in round_ms.items():
                times[name].append(ms)
        done += 1
    return times, discarded


def median_ratio(times: list[float], reference: list[float]) -> float:
    """The median of the per-round ratios: it cancels drifts of the machine's speed better than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(times, reference, strict=True))


@torch.no_grad()
def time_generation(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds of greedy generation of exactly `new_tokens` tokens after each of `prompts` (one batch)."""
    start = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return elapsed


# Training steps, results files and charts


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    """One full training step of `model` on `ids`: forward, backward, gradient clipping at 0.5, optimizer step."""

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


LAYER_TYPES = ("mot", "uniform_mot", "token_choice", "expert_choice")


def build_layers(
    d: int, n_experts: int, group_size: int, layer_types: tuple[str, ...] = LAYER_TYPES
) -> dict[str, torch.nn.Module]:
    """The dense GPT-2 MLP and each expert layer type, FLOP-matched (`expert_size=None`: MoT experts `group_size *
    4d / n_experts` wide, Token and Expert Choice experts `4d` wide with one expert per token), the dense MLP with
    the experts' activation, so that only the layer structure differs; weights normal with std 0.02, dropout 0."""
    layers: dict[str, torch.nn.Module] = {}
    for ffn_type in layer_types:
        if ffn_type == "expert_choice" and group_size < n_experts:
            continue  # fewer than one token per expert and group: not FLOP-matched, refused by the config
        config = MoTGPTConfig(
            n_embd=d,
            n_head=8,
            n_layer=1,
            n_experts=n_experts,
            group_size=group_size,
            resid_pdrop=0.0,
            ffn_type=ffn_type,
            experts_implementation="grouped_mm",  # a model's default; a lone layer would fall back to the loop
        )
        layers[ffn_type] = EXPERT_LAYERS[ffn_type](config)
    config = MoTGPTConfig(n_embd=d, n_head=8, n_layer=1, n_experts=n_experts, group_size=group_size, resid_pdrop=0.0)
    config.activation_function = config.expert_activation
    layers["dense"] = GPT2MLP(config.d_ff, config)
    with torch.no_grad():
        for layer in layers.values():
            for param in layer.parameters():
                torch.nn.init.normal_(param, std=0.02)
    return layers


def make_layer_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One training step of the layer alone: forward, then backward into its parameters and its input."""

    def step() -> None:
        for tensor in (x, *layer.parameters()):
            tensor.grad = None
        layer(x).backward(grad)

    return step


def fullgraph_compile_config() -> CompileConfig:
    """`generate`'s compile settings for static-cache decoding: the forward compiled with `fullgraph=True`, on any
    device (transformers compiles on accelerators only, unless told)."""
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    return config


def rounded(value: object, digits: int = 5) -> object:
    """`value` with every float rounded to `digits` significant digits, for a compact JSON."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def write_json(results: dict, path: Path) -> None:
    """Write a benchmark's results, one line per top-level key, creating the folder."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in results.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (charts written to files, no display needed)."""
    # Imported here, not at the top: importing pyplot is slow, and only a benchmark's plotting step needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """`[step, value]` curves averaged at the steps that every curve measured."""
    by_step = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [[step, statistics.fmean(values)] for step, values in sorted(by_step.items()) if len(values) == len(curves)]


def colour(index: int) -> tuple[float, float, float, float]:
    """The `index`-th of 20 distinct line colours: matplotlib's default cycle repeats after 10, and a benchmark's
    panel can hold more variants. tab20's dark shades come first (the default cycle's hues), then its light ones."""
    import matplotlib

    return matplotlib.colormaps["tab20"]((2 * index) % 20 + (index // 10) % 2)


# The quality benchmark's model variants (also trained and timed by others)


def recipe_variant(recipe: str, family: str, **changes: object) -> tuple[str, dict, dict]:
    """A variant following one of the authors' recipes (`presets.RECIPES`, which names each field's source file):
    its model fields (for a dense twin, the init of its MLP) and training fields, with `changes` to the model."""
    model, training = recipe_fields(recipe, dense=family == "dense")
    return family, model | changes, training


# Variant -> (preset family, config overrides[, training fields]). "k" is the paper's mixtures per expert, E / G (the
# overrides get n_experts = k * G of the backbone); a MoT expert is then d_ff / k wide, so each variant spends the
# dense MLP's expert FLOPs per token, plus MoT's controller and mixing (about 3 * E * d per token and layer, reported
# as the FLOPs ratio). Token and Expert Choice have E = k * G experts of width d_ff / num_experts_per_tok, each token
# processed by num_experts_per_tok of them (on average, for Expert Choice): the same expert FLOPs per token as the
# dense MLP, and with k = num_experts_per_tok the same expert parameters as MoT k 16 (16 dense MLPs). Every MLP uses
# ReLU (the presets' rule, the paper's experts) and, but for `dense_gpt2_init`, the experts' init rule. The training
# fields (weight decay, warm-up, schedule, clipping, and the recipe's learning rate, which joins the tuning grid)
# replace `mot-train`'s defaults; a variant without them trains with those defaults (init 0.1, weight decay 0.1).
VARIANTS = {
    "dense": ("dense", {}),
    "dense_gpt2_init": ("dense", {"mlp_init": "gpt2"}),  # GPT-2's init of the MLP (std 0.02, scaled output weights)
    # The authors' recipes and their dense twins under the same recipe (fields and sources: `presets.RECIPES`).
    "mot_poc": recipe_variant("poc", "mot"),  # configs/baselines/gpt/mot/mini.yaml: k 16, T 1, init 1.0, no decay
    "dense_poc": recipe_variant("poc", "dense"),
    "mot_medium": recipe_variant("medium", "mot"),  # configs/mot/medium_32E_16.yaml: second half, init 0.1, decay 0.1
    "dense_medium": recipe_variant("medium", "dense"),
    # The recipes at T 0.1 (not the authors': their runs use T 1).
    "mot_poc_t0.1": recipe_variant("poc", "mot", router_temperature=0.1),
    "mot_medium_t0.1": recipe_variant("medium", "mot", router_temperature=0.1),
    # Ablations, with the default training: not an authors' recipe.
    "mot_k1": ("mot", {"k": 1}),  # E = G: one mixture per expert (the paper's MoT-Medium/32E/1)
    "mot_k2": ("mot", {"k": 2}),
    "mot_k8": ("mot", {"k": 8}),
    "mot_k16": ("mot", {"k": 16}),  # k 16, T 1, every block, init 0.1 and weight decay 0.1
    "mot_k16_t0.1": ("mot", {"k": 16, "router_temperature": 0.1}),
    "mot_k16_learned_t": ("mot", {"k": 16, "learnable_temperature": "layer"}),
    "mot_k16_second_half": ("mot", {"k": 16, "mot_layers": "second_half"}),
    "mot_k16_second_half_t0.1": ("mot", {"k": 16, "mot_layers": "second_half", "router_temperature": 0.1}),
    "mot_k16_emit_experts": ("mot", {"k": 16, "mot_emit_weights": "experts"}),
    "uniform_mot_k16": ("mot", {"k": 16, "ffn_type": "uniform_mot"}),
    # Fair sparse baselines. Dropless Token Choice (no capacity limit: a Mixtral-style MoE), Switch's balancing loss:
    # top-1 of G experts as wide as the dense MLP, top-2 of 2G experts half as wide.
    "token_choice_top1": (
        "mot",
        {"k": 1, "ffn_type": "token_choice", "capacity_factor": None, "output_router_logits": True},
    ),
    "token_choice_top2": (
        "mot",
        {
            "k": 2,
            "ffn_type": "token_choice",
            "num_experts_per_tok": 2,
            "capacity_factor": None,
            "output_router_logits": True,
        },
    ),
    # Expert Choice with the authors' output normalization: each expert takes capacity_factor (1) * G * (experts per
    # token) / E tokens of a group, so the group's picks equal its tokens times the experts per token; some tokens are
    # still picked twice and others never (`expert_choice_unprocessed`). `_top2`: 2G experts half as wide, each token
    # picked twice on average (Expert Choice's capacity factor 2, at the dense MLP's FLOPs).
    "expert_choice_norm": ("mot", {"k": 1, "ffn_type": "expert_choice", "expert_choice_output_norm": True}),
    "expert_choice_norm_top2": (
        "mot",
        {"k": 2, "ffn_type": "expert_choice", "num_experts_per_tok": 2, "expert_choice_output_norm": True},
    ),
    # Extra rows, the earlier baselines: Token Choice with a capacity limit (drops assignments) and Expert Choice
    # without the output normalization.
    "token_choice": (
        "mot",
        {"k": 1, "ffn_type": "token_choice", "capacity_factor": 1.25, "output_router_logits": True},
    ),
    "expert_choice": ("mot", {"k": 1, "ffn_type": "expert_choice"}),
}


def variant_config(variant: str, backbone: str) -> dict:
    """The (preset, config overrides, training fields) of a variant on a backbone, with "k" resolved to
    n_experts = k * G."""
    family, overrides, training = (*VARIANTS[variant], {})[:3]
    overrides = {"mlp_init": "experts"} | overrides
    if "k" in overrides:
        overrides["n_experts"] = overrides.pop("k") * preset_config(f"mot-{backbone}").group_size
    return {"preset": f"{family}-{backbone}", "overrides": overrides, "training": dict(training)}


def variant_model(spec: dict, vocab_size: int, block_size: int) -> MoTGPTForCausalLM:
    """A fresh model of a `variant_config` spec, sized to the vocabulary and block."""
    return MoTGPTForCausalLM(
        preset_config(spec["preset"], vocab_size=vocab_size, n_positions=block_size, **spec["overrides"])
    )


@torch.no_grad()
def expert_choice_unprocessed(model: MoTGPTForCausalLM, input_ids: torch.Tensor) -> list[float]:
    """For each Expert Choice layer of `model`, in block order, the fraction of the tokens of `input_ids` (all real,
    whole groups of rows) that no expert picks, so that the layer leaves them without an update, measured on the
    hidden states the layer receives (`ExpertChoiceLayer.unprocessed_fraction`)."""
    fractions = []

    def measure(layer: ExpertChoiceLayer, args: tuple) -> None:
        fractions.append(layer.unprocessed_fraction(args[0]))

    layers = [module for module in model.modules() if isinstance(module, ExpertChoiceLayer)]
    hooks = [layer.register_forward_pre_hook(measure) for layer in layers]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return fractions
