"""The paper's comparison at CPU scale, tuned and seeded: dense and MoT under the authors' recipes (`poc`, `medium`)
and MoT's ablations, uniform-routing MoT, dropless Token Choice (top-1 and top-2, with Switch's balancing loss) and
Expert Choice with the authors' output normalization, at equal expert FLOPs per token, trained on the same tokens
with the same schedule and scored on the same 2,048 held-out blocks.

A benchmark, not a test. Every run trains one variant (`common.VARIANTS`) of a backbone (`tiny`: 4 blocks, d 128, G 16;
`small`: the proof of concept's 4 blocks, d 256, G 32; `medium`: the paper's 8 blocks, d 512, G 32, experts in the
second half) with `mot-train`'s code path on the
bundled State of the Union corpus, and evaluates its validation loss every `--eval_steps` steps on `--eval_blocks`
held-out blocks drawn in a fixed shuffled order (every held-out speech, MoT groups of blocks of different speeches,
full groups only). The stages build on each other:

    python benchmarks/quality.py --stage tune     # every TUNED variant at each of --learning_rates (seed 0)
    python benchmarks/quality.py --stage final    # dense, best MoT and best sparse model at their best rate, 3 seeds
    python benchmarks/quality.py --stage regime   # MoT's ablations, the earlier sparse baselines (borrowed rates)
    python benchmarks/quality.py --stage regime --variants mot_k16 --regime_seeds 1 2   # an ablation's seed spread
    python benchmarks/quality.py --stage long     # dense and the best MoT for --long_factor times the tokens
    python benchmarks/quality.py                  # rebuild the summary from the committed curves, train nothing
    python benchmarks/quality.py --device cuda --bf16 --backbone medium --stage final   # on a GPU

Tuning is at the budget compared: a tuning run has the final comparison's `--max_steps` (so it is also that rate's
seed-0 run), and the tune stage widens a variant's grid (half the lowest rate, twice the highest) while its best rate
is at an edge. The final and regime stages refuse to run while a tuned model has fewer than three rates or its best
at an edge of them.

Each finished run writes its compact curve to `--curves_dir` (one JSON per run, committed), and the summary
(`--out` JSON and PNG) is always rebuilt from those files alone, so the comparison can be rebuilt without training
and continued run by run on other machines. Run folders (`--runs_dir`) hold the checkpoints: an interrupted run
resumes, a finished one is skipped (a resumed run's `training_seconds` count from `timed_from_step`).

A recipe variant trains with its recipe's training fields (weight decay, warm-up, schedule, clipping) and its
learning rate joins the tuning grid. A run that would see its training text more than once (more steps than the
training blocks fill batches) is refused unless `--allow_repeats` is given; such a run is marked `repeats_text` in its
curve and in the summary, with the epochs it saw.
"""

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    VARIANTS,
    colour,
    expert_choice_unprocessed,
    machine_info,
    mean_curve,
    pyplot,
    variant_config,
    variant_model,
    write_json,
)
from safetensors import safe_open
from transformers import AutoTokenizer

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.card import flops_per_token, parameter_counts
from mixture_of_tokens.data import load_sotu, load_text, pack, sample_blocks, train_bpe_tokenizer
from mixture_of_tokens.run_log import train_or_reuse, validation_curve
from mixture_of_tokens.training import MoTTrainingArguments, ScriptArguments, run_training

# Tuned: every model type at each learning rate (and at its recipe's). Dense and MoT under each of the authors' recipes
# and under the default training (MoT k 16 at T 1 and T 0.1, and at T 0.1 in the second half: the ablations' best, so
# a final pick has its own rate), and the fair sparse baselines. The best MoT lends its rate to the MoT ablations; the
# other untuned variants take the rate of the variant they derive from (`RATE_FROM`).
DENSE_TUNED = ("dense", "dense_poc", "dense_medium")
MOT_TUNED = ("mot_poc", "mot_medium", "mot_k16", "mot_k16_t0.1", "mot_k16_second_half_t0.1")
SPARSE = ("token_choice_top1", "token_choice_top2", "expert_choice_norm", "expert_choice_norm_top2")
TUNED = (*DENSE_TUNED, *MOT_TUNED, *SPARSE)
RATE_FROM = {"dense_gpt2_init": "dense", "mot_poc_t0.1": "mot_poc", "mot_medium_t0.1": "mot_medium",
             "token_choice": "token_choice_top1", "expert_choice": "expert_choice_norm"}  # fmt: skip
REGIME = ("mot_k1", "mot_k2", "mot_k8", "mot_k16", "mot_k16_t0.1", "mot_k16_learned_t", "mot_k16_second_half",
          "mot_k16_second_half_t0.1", "mot_k16_emit_experts", "uniform_mot_k16", "dense_gpt2_init", "mot_poc_t0.1",
          "mot_medium_t0.1", "token_choice", "expert_choice")  # fmt: skip
QUICK = {"max_steps": 4, "eval_steps": 2, "block_size": 16, "batch_size": 16, "eval_blocks": 16, "grid_extensions": 0}
# A tuning grid is widened (the best rate halved or doubled) while its best rate is the lowest or highest tried, at
# most `--grid_extensions` times; a final comparison needs at least this many rates with the best inside.
MIN_TUNED_RATES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["tune", "final", "regime", "long", "summary"], default="summary")
    parser.add_argument(
        "--backbone", choices=["tiny", "small", "medium"], default="tiny", help="small: the proof of concept's"
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="train only these of the stage's runs")
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds the final stage trains")
    parser.add_argument(
        "--regime_seeds", type=int, nargs="+", default=[0], help="seeds of the regime stage (more: its seed spread)"
    )
    parser.add_argument(
        "--tune_steps", type=int, help="steps of each tuning run (default: --max_steps, the budget compared)"
    )
    parser.add_argument(
        "--grid_extensions", type=int, default=2, help="most widenings of a grid whose best rate is at an edge"
    )
    parser.add_argument("--max_steps", type=int, default=1000, help="steps of each final and regime run")
    parser.add_argument("--long_factor", type=int, default=5, help="the long stage trains this many times longer")
    parser.add_argument("--eval_steps", type=int, default=200)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_blocks", type=int, default=2048, help="held-out blocks, in a fixed shuffled order")
    parser.add_argument("--corpus", nargs="+", default=["sotu"], help="training text, as for mot-train")
    parser.add_argument("--validation", nargs="*", default=[], help="validation text; default: held-out speeches")
    parser.add_argument("--vocab_size", type=int, default=8192, help="size of the byte-level BPE trained on it")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (on a GPU)")
    parser.add_argument("--data_cache_dir", default=".cache/mot-data")
    parser.add_argument("--runs_dir", default="runs/quality")
    parser.add_argument("--curves_dir", default=str(RESULTS / "quality"), help="one compact JSON per finished run")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    parser.add_argument("--quick", action="store_true", help="a few tiny steps of every run (smoke test)")
    parser.add_argument(
        "--allow_repeats", action="store_true", help="train runs that see their training text more than once"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.tune_steps is None:
        args.tune_steps = args.max_steps
    return args


def run_id(variant: str, learning_rate: float, seed: int, steps: int) -> str:
    return f"{variant}-lr{learning_rate:g}-s{seed}-{steps}"


def train(variant: str, learning_rate: float, seed: int, steps: int, args: argparse.Namespace) -> dict:
    """Train one run (resuming a stopped one, skipping one whose curve exists), write its curve file, return it."""
    name = run_id(variant, learning_rate, seed, steps)
    curve_file = Path(args.curves_dir) / args.backbone / f"{name}.json"
    spec, settings = variant_config(variant, args.backbone), run_settings(args)
    if curve_file.exists():
        record = json.loads(curve_file.read_text())
        # A curve from before the training fields were recorded trained with the defaults: no training fields.
        now = {**spec, "settings": settings}
        changed = {key: (record.get(key, {}), value) for key, value in now.items() if record.get(key, {}) != value}
        if changed:
            raise ValueError(
                f"the committed run {curve_file} was made with other settings (recorded, now): {changed}. "
                "Give another --curves_dir, or delete that file to train the run again."
            )
        return record
    text_use = check_repeats(name, steps, args)
    output_dir = Path(args.runs_dir) / args.backbone / name
    script = ScriptArguments(
        preset=spec["preset"],
        model=[f"{key}={json.dumps(value)}" for key, value in spec["overrides"].items()],
        corpus=args.corpus,
        validation=args.validation,
        vocab_size=args.vocab_size,
        data_cache_dir=args.data_cache_dir,
        block_size=args.block_size,
        max_eval_blocks=args.eval_blocks,
    )
    # Tuning runs are scored once, at the end; the others every eval_steps (the long runs too: their gap against
    # tokens needs the points, and each evaluation is also a checkpoint to resume from).
    eval_steps = steps if steps < args.max_steps else args.eval_steps
    training_args = MoTTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        eval_steps=eval_steps,
        save_steps=eval_steps,
        logging_steps=eval_steps,
        seed=seed,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        disable_tqdm=True,
        **{key: value for key, value in spec["training"].items() if key != "learning_rate"},
    )
    print(f"[quality] {name}: {steps} steps", flush=True)
    tick = time.time()
    # A resumed run is timed from its checkpoint's step on.
    started_at = train_or_reuse(script, training_args, run_training)
    seconds = time.time() - tick
    model = variant_model(spec, json.loads((output_dir / "config.json").read_text())["vocab_size"], args.block_size)
    total, active = parameter_counts(model)
    record = {
        "run": name,
        "variant": variant,
        "backbone": args.backbone,
        **spec,
        "learning_rate": learning_rate,
        "seed": seed,
        "max_steps": steps,
        "tokens_per_step": args.batch_size * args.block_size,
        **text_use,
        "settings": settings,
        "validation_curve": validation_curve(output_dir),
        "learned_temperatures": learned_temperatures(output_dir),
        "expert_choice_unprocessed": unprocessed_on_validation(output_dir, spec, args),
        "parameters": total,
        "active_parameters_per_token": active,
        "flops_per_token": flops_per_token(model),
        "training_seconds": round(seconds, 1),
        "timed_from_step": steps if started_at is None else started_at,
        "machine": machine_info(),
    }
    write_json(record, curve_file)
    return record


@functools.cache
def training_blocks(corpus: tuple[str, ...], vocab_size: int, block_size: int, cache_dir: str) -> int:
    """How many blocks a run's training text packs into: the same BPE and blocks as `mot-train` makes (the BPE is
    deterministic and the block cache shared, so the run itself does not tokenize again)."""
    text = load_text(list(corpus))
    return len(pack(text, train_bpe_tokenizer(text["text"], vocab_size), block_size, cache_dir))


def unprocessed_on_validation(output_dir: Path, spec: dict, args: argparse.Namespace) -> list[float] | None:
    """An Expert Choice run's fraction of held-out tokens that each Expert Choice layer leaves without an update, on
    the first evaluation batch (`common.expert_choice_unprocessed`); None for the other layer types."""
    if spec["overrides"].get("ffn_type") != "expert_choice":
        return None
    text = load_text(args.validation) if args.validation else load_sotu()["validation"]
    blocks = pack(text, AutoTokenizer.from_pretrained(output_dir), args.block_size, args.data_cache_dir)
    batch = torch.tensor(sample_blocks(blocks, args.batch_size)["input_ids"])  # the evaluation's first batch
    return expert_choice_unprocessed(MoTGPTForCausalLM.from_pretrained(output_dir), batch)


def check_repeats(name: str, steps: int, args: argparse.Namespace) -> dict:
    """Refuse a run that would see its training text more than once (unless `--allow_repeats`); return what it sees:
    training tokens, tokens seen, epochs (their ratio) and whether it repeats text. An epoch is the training blocks
    // batch size steps (the loader drops the last partial batch), so a run repeats text past that many steps."""
    blocks = training_blocks(tuple(args.corpus), args.vocab_size, args.block_size, args.data_cache_dir)
    total, seen = blocks * args.block_size, steps * args.batch_size * args.block_size
    repeats = steps > blocks // args.batch_size
    if repeats and not args.allow_repeats:
        raise ValueError(
            f"run {name} would see {seen:,} tokens of a training text of {total:,} tokens ({seen / total:.2f} "
            f"epochs; one epoch is {blocks // args.batch_size} steps): it would repeat its training text. Pass "
            "--allow_repeats to train it anyway (it is marked repeats_text), or train fewer steps or on more text."
        )
    return {"training_tokens": total, "tokens_seen": seen, "epochs": round(seen / total, 3), "repeats_text": repeats}


def tune(variant: str, args: argparse.Namespace) -> None:
    """Train a variant's tuning runs (seed 0, `tune_steps`) at its grid of rates, then widen the grid while the best
    rate is the lowest or highest tried: half the lowest or twice the highest, at most `grid_extensions` times."""
    rates = tuning_rates(variant, args)
    for extension in range(args.grid_extensions + 1):
        losses = {rate: final_loss(train(variant, rate, 0, args.tune_steps, args)) for rate in rates}
        best = min(losses, key=losses.get)
        if min(rates) < best < max(rates) or extension == args.grid_extensions:
            return
        rates.append(best / 2 if best == min(rates) else best * 2)


def grid_problems(curves: dict[str, dict], steps: int, variants: tuple[str, ...]) -> dict[str, str]:
    """Why a tuned variant's rate cannot be used for a comparison: fewer than `MIN_TUNED_RATES` rates tried at
    `steps` steps, or its best rate at an edge of those tried (a better one may lie beyond)."""
    problems = {}
    for variant in variants:
        losses = {r["learning_rate"]: final_loss(r) for r in tuning_runs(curves, variant, steps)}
        if len(losses) < MIN_TUNED_RATES:
            problems[variant] = f"{len(losses)} rates tuned at {steps} steps, fewer than {MIN_TUNED_RATES}"
        elif min(losses, key=losses.get) in (min(losses), max(losses)):
            best = min(losses, key=losses.get)
            problems[variant] = f"best rate {best:g} is at the edge of those tried ({sorted(losses)})"
    return problems


def tuning_rates(variant: str, args: argparse.Namespace) -> list[float]:
    """The learning rates a variant is tuned at: `--learning_rates` and its recipe's rate, if it has one."""
    recipe_rate = variant_config(variant, args.backbone)["training"].get("learning_rate")
    return sorted(set(args.learning_rates) | ({recipe_rate} if recipe_rate else set()))


def learned_temperatures(output_dir: Path) -> list[list[float]] | None:
    """The router temperatures a run learned, one list per MoT layer in layer order (None with fixed ones)."""
    with safe_open(str(output_dir / "model.safetensors"), "pt") as weights:
        names = [name for name in weights.keys() if name.endswith("log_temperature")]
        # Layer order, not string order (h.10 after h.9).
        names.sort(key=lambda name: [int(part) if part.isdigit() else part for part in name.split(".")])
        return [weights.get_tensor(name).exp().tolist() for name in names] or None


def run_settings(args: argparse.Namespace) -> dict:
    """The benchmark settings that change what a run computes, besides its variant, rate, seed and steps."""
    keys = ("block_size", "batch_size", "eval_blocks", "corpus", "validation", "vocab_size", "device", "bf16")
    return {key: getattr(args, key) for key in keys}


def load_curves(curves_dir: str | Path, backbone: str) -> dict[str, dict]:
    """Every committed run of a backbone, by run id."""
    files = sorted((Path(curves_dir) / backbone).glob("*.json"))
    return {record["run"]: record for record in (json.loads(f.read_text()) for f in files)}


def final_loss(record: dict) -> float:
    return record["validation_curve"][-1][1]


def tuning_runs(curves: dict[str, dict], variant: str, steps: int) -> list[dict]:
    """The tuning runs of a variant: seed 0, `steps` steps, one per learning rate tried."""
    return [r for r in curves.values() if r["variant"] == variant and r["max_steps"] == steps and r["seed"] == 0]


def best_learning_rates(curves: dict[str, dict], steps: int) -> dict[str, float]:
    """Each tuned variant's learning rate with the lowest final loss among its tuning runs of `steps` steps (also a
    variant tuned before it left `TUNED`)."""
    best = {}
    for variant in VARIANTS:
        runs = tuning_runs(curves, variant, steps)
        if runs:
            best[variant] = min(runs, key=final_loss)["learning_rate"]
    return best


def best_tuned(curves: dict[str, dict], steps: int, variants: tuple[str, ...]) -> str | None:
    """Of `variants`, the one with the lowest tuning loss at its best learning rate (None before tuning)."""
    rates = best_learning_rates(curves, steps)
    losses = {v: final_loss(curves[run_id(v, rates[v], 0, steps)]) for v in variants if v in rates}
    return min(losses, key=losses.get) if losses else None


def learning_rates(curves: dict[str, dict], steps: int) -> dict[str, float]:
    """The learning rate of every variant: its own tuned one, else that of the variant it derives from (`RATE_FROM`),
    else the best tuned MoT variant's."""
    rates = best_learning_rates(curves, steps)
    mot = best_tuned(curves, steps, MOT_TUNED)
    for variant in VARIANTS:
        source = RATE_FROM.get(variant, mot)
        if variant not in rates and source in rates:
            rates[variant] = rates[source]
    return rates


def seeded_runs(curves: dict[str, dict], variant: str, rate: float, args: argparse.Namespace) -> list[dict]:
    """A variant's runs of `max_steps` steps at `rate`, one per seed that has run, in seed order: every seed, not only
    `args.seeds` (the seeds a call trains), so the pick and the table do not depend on which seeds a call names."""
    runs = [
        r
        for r in curves.values()
        if (r["variant"], r["learning_rate"], r["max_steps"]) == (variant, rate, args.max_steps)
    ]
    return sorted(runs, key=lambda record: record["seed"])


def chosen_models(curves: dict[str, dict], args: argparse.Namespace) -> dict[str, str]:
    """The final comparison's models: the best dense variant and the best sparse one (lowest tuning loss), and the
    best MoT variant.

    The best MoT variant has the lowest mean loss over the seeds it was run on for `max_steps` (else it is the best
    tuned one). A regime run has seed 0 only, so a variant that wins on seed 0 is picked, the final stage runs its
    other seeds, and it stays the pick only if its mean over all of them is still the lowest."""
    rates = learning_rates(curves, args.tune_steps)
    chosen = {"dense": best_tuned(curves, args.tune_steps, DENSE_TUNED) or "dense",
              "mot": best_tuned(curves, args.tune_steps, MOT_TUNED)}  # fmt: skip
    losses = {}
    for variant, rate in rates.items():
        runs = seeded_runs(curves, variant, rate, args)
        if variant.startswith("mot") and runs:
            losses[variant] = [final_loss(r) for r in runs]
    if losses:
        chosen["mot"] = min(losses, key=lambda variant: statistics.fmean(losses[variant]))
    sparse = best_tuned(curves, args.tune_steps, SPARSE)
    if sparse:
        chosen["sparse"] = sparse
    return {role: variant for role, variant in chosen.items() if variant is not None}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation loss reaches `target`, interpolated linearly between evaluations
    (`None` if it never does). A run already below `target` at its first evaluation is credited with that step."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None:
                return float(step)
            (step0, loss0) = previous
            return step0 + (step - step0) * (loss0 - target) / (loss0 - loss)
        previous = (step, loss)
    return None


def mean_and_spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "min": min(values), "max": max(values), "n": len(values)}


def compare(losses: dict, reference: dict) -> dict:
    """A model's mean loss minus a reference model's, its standard error over the seeds (Welch), whether the gap
    exceeds twice that, and whether the two ranges over seeds overlap. The error is None until both have two seeds."""
    gap = losses["mean"] - reference["mean"]
    error = None
    if min(losses["n"], reference["n"]) > 1:
        error = (losses["std"] ** 2 / losses["n"] + reference["std"] ** 2 / reference["n"]) ** 0.5
    return {
        "gap": gap,
        "gap_standard_error": error,
        "gap_exceeds_two_standard_errors": None if error is None else abs(gap) > 2 * error,
        "ranges_overlap": losses["min"] <= reference["max"] and reference["min"] <= losses["max"],
    }


def summarize(curves: dict[str, dict], args: argparse.Namespace) -> dict:
    """The summary table, from the curve files alone: tuning grid, final comparison (mean and spread over seeds, the
    gap between each pair and whether it exceeds the spread), regime ablations and the long runs' gap against tokens.

    `final` holds the chosen models and every model once chosen (run on more than one seed), so a result stays in the
    summary after the regime stage picks another MoT variant; `long` likewise holds every long run."""
    rates = learning_rates(curves, args.tune_steps)
    tuning = {
        variant: {f"{r['learning_rate']:g}": final_loss(r) for r in tuning_runs(curves, variant, args.tune_steps)}
        for variant in TUNED
    }
    chosen = chosen_models(curves, args)
    roles = {variant: role for role, variant in chosen.items()}
    dense_runs = [r for r in curves.values() if r["variant"] == chosen["dense"]]
    dense_flops = dense_runs[0]["flops_per_token"] if dense_runs else None
    final = {}
    for variant, rate in rates.items():
        runs = seeded_runs(curves, variant, rate, args)
        if runs and (variant in roles or len(runs) > 1):
            final[variant] = {"role": roles.get(variant), "learning_rate": rate, "final_validation_loss":
                              mean_and_spread([final_loss(r) for r in runs]), "seeds": [r["seed"] for r in runs],
                              "flops_ratio_to_dense": runs[0]["flops_per_token"] / dense_flops if dense_flops else None,
                              "mean_curve": mean_curve([r["validation_curve"] for r in runs]),
                              **text_use(runs)}  # fmt: skip
    dense = final.get(chosen["dense"])
    for entry in final.values():
        if dense and entry is not dense:
            # Steps, on the seed-mean curves: this model's to reach dense's final loss, and dense's to reach this one's.
            entry["steps_to_dense_final_loss"] = steps_to_reach(entry["mean_curve"], dense["mean_curve"][-1][1])
            entry["dense_steps_to_this_final_loss"] = steps_to_reach(dense["mean_curve"], entry["mean_curve"][-1][1])
            # The gap against tokens within the comparison's budget (under one epoch unless marked repeats_text).
            entry["gap_against_tokens"] = gap_against_tokens(entry["mean_curve"], dense["mean_curve"], args)
    # Every pair of the final models, e.g. "mot_k16 - dense": the gap of the seed means, and whether it exceeds the
    # spread.
    losses, variants = {variant: entry["final_validation_loss"] for variant, entry in final.items()}, list(final)
    differences = {
        f"{variant} - {reference}": compare(losses[variant], losses[reference])
        for index, reference in enumerate(variants) for variant in variants[index + 1 :]
    }  # fmt: skip
    regime = {}
    for variant in REGIME:
        rate = rates.get(variant)
        record = curves.get(run_id(variant, rate, 0, args.max_steps)) if rate else None
        if record:
            regime[variant] = {"learning_rate": rate, "final_validation_loss": final_loss(record),
                               "flops_ratio_to_dense": record["flops_per_token"] / dense_flops if dense_flops else None,
                               "config": record["overrides"],
                               "learned_temperatures": record.get("learned_temperatures")}  # fmt: skip
    long = {}
    for variant, rate in rates.items():
        record = curves.get(run_id(variant, rate, 0, args.max_steps * args.long_factor))
        if record:
            long[variant] = {"role": roles.get(variant), "learning_rate": rate,
                             "validation_curve": record["validation_curve"], **text_use([record])}  # fmt: skip
    dense_long = long.get(chosen["dense"])
    for entry in long.values():
        if dense_long and entry is not dense_long:
            entry["gap_against_tokens"] = gap_against_tokens(
                entry["validation_curve"], dense_long["validation_curve"], args
            )
            entry["dense_steps_to_this_final_loss"] = steps_to_reach(
                dense_long["validation_curve"], entry["validation_curve"][-1][1]
            )
    repeating = sorted(name for name, record in curves.items() if record.get("repeats_text"))
    return {"tuned_learning_rates": best_learning_rates(curves, args.tune_steps), "learning_rates": rates,
            "tune_steps": args.tune_steps, "grid_problems": grid_problems(curves, args.tune_steps, TUNED),
            "tuning_final_loss": tuning, "chosen": chosen, "final": final, "differences": differences,
            "regime": regime, "long": long, "runs_repeating_text": repeating}  # fmt: skip


def gap_against_tokens(curve: list, dense_curve: list, args: argparse.Namespace) -> list[list[float]]:
    """`[tokens seen, loss - dense's loss]` at each step that both curves evaluated."""
    dense_at = dict(dense_curve)
    tokens_per_step = args.batch_size * args.block_size
    return [[step * tokens_per_step, loss - dense_at[step]] for step, loss in curve if step in dense_at]


def text_use(runs: list[dict]) -> dict:
    """The most epochs of training text any of `runs` saw and whether one repeated it (None for runs recorded before
    this was)."""
    epochs = [record.get("epochs") for record in runs]
    return {"epochs": None if None in epochs else max(epochs), "repeats_text": any(r.get("repeats_text") for r in runs)}


def plot(curves: dict[str, dict], summary: dict, args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()

    fig, (tune_ax, final_ax, long_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    for index, (variant, losses) in enumerate(summary["tuning_final_loss"].items()):
        if losses:
            rates = sorted(losses, key=float)
            tune_ax.plot([float(r) for r in rates], [losses[r] for r in rates], marker="o", color=colour(index),
                         label=variant)  # fmt: skip
    tune_ax.set_xscale("log")
    tune_ax.set_title(f"tuning: loss after {args.tune_steps} steps")
    tune_ax.set_xlabel("peak learning rate")
    for index, (variant, entry) in enumerate(summary["final"].items()):
        for seed in entry["seeds"]:
            record = curves[run_id(variant, entry["learning_rate"], seed, args.max_steps)]
            steps, losses = zip(*record["validation_curve"], strict=True)
            label = f"{variant} (lr {entry['learning_rate']:g})" if seed == entry["seeds"][0] else None
            final_ax.plot(steps, losses, color=colour(index), alpha=0.8, label=label)
    final_ax.set_title(f"final comparison, {args.max_steps} steps, every seed")
    final_ax.set_xlabel("training step")
    if summary["final"]:
        low = min(e["final_validation_loss"]["min"] for e in summary["final"].values())
        final_ax.set_ylim(low - 0.1, low + 1.2)
    # The final models' seed-mean gaps (solid) and the long runs' (dashed), in the final panel's colours.
    colours = {variant: colour(index) for index, variant in enumerate(summary["final"])}
    for style, entries in (("-", summary["final"]), ("--", summary["long"])):
        for variant, entry in entries.items():
            if "gap_against_tokens" in entry:
                tokens, gaps = zip(*entry["gap_against_tokens"], strict=True)
                long_ax.plot([t / 1e6 for t in tokens], gaps, ls=style, marker="o", color=colours.get(variant, "k"),
                             label=variant + (" (long)" if style == "--" else ""))  # fmt: skip
    long_ax.axhline(0, color="gray", ls=":")
    long_ax.set_title("minus dense: final models (seed means), long runs (dashed)")
    long_ax.set_xlabel("tokens seen (millions)")
    for ax in (tune_ax, final_ax, long_ax):
        ax.set_ylabel("validation loss (nats/token)" if ax is not long_ax else "loss gap (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_stage(args: argparse.Namespace) -> None:
    """Train the runs of `args.stage` (those of `args.variants` only, if given) that have no curve yet, given the
    curves of the stages before it."""

    def train_if_chosen(variant: str, learning_rate: float, seed: int, steps: int) -> None:
        if args.variants is None or variant in args.variants:
            train(variant, learning_rate, seed, steps, args)

    if args.stage == "tune":
        for variant in TUNED:
            if args.variants is None or variant in args.variants:
                tune(variant, args)
        return
    if args.tune_steps != args.max_steps and not args.quick:
        raise ValueError(
            f"--stage {args.stage} compares runs of {args.max_steps} steps, so their rates must be tuned at that "
            f"budget: --tune_steps is {args.tune_steps}. Leave --tune_steps out (it defaults to --max_steps)."
        )
    curves = load_curves(args.curves_dir, args.backbone)
    missing = [v for v in TUNED if v not in best_learning_rates(curves, args.tune_steps)]
    if missing:
        raise ValueError(f"--stage {args.stage} needs the tuning runs of {missing}: run --stage tune first.")
    problems = {} if args.quick else grid_problems(curves, args.tune_steps, TUNED)
    if problems:
        raise ValueError(
            f"--stage {args.stage} needs every tuned model's best rate inside a grid of at least {MIN_TUNED_RATES}: "
            f"{problems}. Run --stage tune (it widens such grids) or give more --learning_rates."
        )
    rates, chosen = learning_rates(curves, args.tune_steps), chosen_models(curves, args)
    if args.stage == "regime":
        for seed in args.regime_seeds:
            for variant in REGIME:
                train_if_chosen(variant, rates[variant], seed, args.max_steps)
    elif args.stage == "final":
        for seed in args.seeds:
            for variant in chosen.values():
                train_if_chosen(variant, rates[variant], seed, args.max_steps)
    elif args.stage == "long":
        for variant in (chosen["dense"], chosen["mot"]):
            train_if_chosen(variant, rates[variant], 0, args.max_steps * args.long_factor)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.stage != "summary":
        run_stage(args)
    curves = load_curves(args.curves_dir, args.backbone)
    results = {
        "benchmark": "validation loss at (nearly) equal FLOPs per token, tuned learning rates, several seeds",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "stage", "runs_dir", "curves_dir")},
        "summary": summarize(curves, args),
        "runs": {name: {key: record[key] for key in ("variant", "learning_rate", "seed", "max_steps",
                                                      "parameters", "flops_per_token", "training_seconds")}
                 | {"final_validation_loss": final_loss(record), **text_use([record])}
                 for name, record in curves.items()},
    }  # fmt: skip
    out = Path(args.out)
    write_json(results, out)
    plot(curves, results["summary"], args, out.with_suffix(".png"))
    for variant, entry in results["summary"]["final"].items():
        loss = entry["final_validation_loss"]
        repeats = f" (repeats its text: {entry['epochs']} epochs)" if entry["repeats_text"] else ""
        role = entry["role"] or ""
        print(f"[quality] {variant:22s} {role:6s} {loss['mean']:.4f} +- {loss['std']:.4f} (n {loss['n']}){repeats}")
    return results


if __name__ == "__main__":
    main()
