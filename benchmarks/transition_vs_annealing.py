"""Transition tuning against temperature annealing: two ways to serve a MoT model without its batch.

A benchmark, not a test. Steps:

1. Train a MoT model (preset `mot-tiny`, blocks of 64 tokens, batch 32, 500 steps by default) or take `--mot_run`
   (its step count from its metrics.jsonl, or `--mot_steps`).
2. Validation loss of the MoT model, with evaluation rows grouped as in training (consecutive blocks in groups).
3. Convert it to Token Choice with `mot-transition-tune`'s path (`mixture_of_tokens.transition`: router bias
   calibrated on 64 training blocks, balancing loss on, router bias calibrated again at the end) and transition-tune
   it for N = 10% of the MoT run's steps, saving a checkpoint every few steps. The benchmark evaluates each itself
   (the `Trainer`'s evaluation loss would include the balancing loss) and the final model: validation loss, and
   router balance on the first `--balance_blocks` validation blocks (the busiest expert's share of first choices
   against the uniform share, experts nobody picks first). The conversion without the router bias is measured too.
4. Train the annealing path: the same MoT run (same steps, same seed) with `--anneal_temperature true`, evaluated
   with discrete routing (T = 0). `--skip_annealing` skips it. A `--mot_run` needs `--skip_annealing`: a faithful
   annealed twin would repeat that run's training exactly (its tokenizer, corpus, config, schedule and seed), which
   its config.json alone does not record, and a twin that differs would not be a comparison.
5. Compute and speed of the tuned model: the rows its expert matmuls process per (token, expert) assignment, counted
   in a training step and in cached decoding; training-step time (AdamW) and greedy-generation tokens per second
   against the dense twin (the same blocks with GPT-2's MLP and the experts' ReLU, freshly initialized) and the MoT
   model, interleaved, on held-out blocks: batch `--batch_size` (and 1, without MoT, whose lone row would be a group
   of one), the first quarter of each block as the prompt and the rest generated.

All losses are mean next-token cross-entropies (nats/token) on the same first `--eval_blocks` validation blocks.
Writes `--out` (JSON, one line per key) and a plot beside it. Runs live in `--runs_dir`: a finished run is reused,
an interrupted one resumed from its last checkpoint.

Usage, from the repository root:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transition_vs_annealing.py     # about 25 minutes on one CPU thread
    .venv/bin/python benchmarks/transition_vs_annealing.py --mot_run runs/mot-tiny --block_size 128 --skip_annealing
    .venv/bin/python benchmarks/transition_vs_annealing.py --quick   # a tiny smoke run of a few seconds
"""

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from common import (
    interleaved_times,
    machine_info,
    make_step,
    median_ratio,
    pyplot,
    rounded,
    time_generation,
    write_json,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations import moe

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.conversion import mot_to_token_choice
from mixture_of_tokens.data import head, load_sotu, load_text, pack, sotu_speech_files
from mixture_of_tokens.evaluation import evaluate_perplexity
from mixture_of_tokens.run_log import read_metrics, train_or_reuse, validation_curve
from mixture_of_tokens.training import MoTTrainingArguments, ScriptArguments, parse_args, run_training
from mixture_of_tokens.transition import TRANSITION_DEFAULTS, TransitionArguments, run_transition_tuning

TARGET = 0.02  # converted model's validation loss within 2% of the MoT model's after N steps
QUICK_MODEL = ["n_layer=1", "n_embd=32", "n_head=2", "n_experts=8", "group_size=4"]


def parse_benchmark_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mot_run", help="a trained MoTGPT run to start from (needs --skip_annealing)")
    parser.add_argument("--mot_steps", type=int, help="steps of --mot_run (default: read from its metrics.jsonl)")
    parser.add_argument("--skip_annealing", action="store_true", help="no annealed MoT run (needed with --mot_run)")
    parser.add_argument("--max_steps", type=int, default=500, help="steps of the MoT and annealed runs")
    parser.add_argument("--tune_fraction", type=float, default=0.1, help="transition-tuning steps / MoT steps")
    parser.add_argument("--tune_eval_every", type=int, default=5, help="evaluate every this many tuning steps")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--eval_blocks", type=int, default=512, help="validation blocks in every evaluation")
    parser.add_argument("--balance_blocks", type=int, default=64, help="validation blocks of the router balance")
    parser.add_argument("--speed_repeats", type=int, default=5, help="timed rounds of the speed measurements")
    parser.add_argument("--runs_dir", default="runs/transition")
    parser.add_argument("--out", default="benchmarks/results/transition.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny corpus, a few steps")
    args = parser.parse_args(argv)
    check_mot_run(args)
    if args.quick:
        args.max_steps, args.tune_fraction, args.tune_eval_every = 20, 0.1, 1
        args.batch_size, args.block_size, args.eval_blocks, args.balance_blocks, args.speed_repeats = 8, 32, 16, 16, 1
    return args


def check_mot_run(args: argparse.Namespace) -> None:
    """Refuse `--mot_run` without `--skip_annealing` (see the module docstring) and a `--mot_steps` that is not
    about a given run, before anything is trained."""
    if args.mot_run and not args.skip_annealing:
        raise ValueError(
            f"`--mot_run`={args.mot_run!r} needs --skip_annealing: the annealed twin would have to repeat that run's "
            "training exactly (tokenizer, corpus, config, schedule, seed), which its config.json does not record. "
            "Pass --skip_annealing, or leave out --mot_run to train both runs here."
        )
    if args.mot_steps is not None and (not args.mot_run or args.mot_steps < 1):
        raise ValueError(
            f"`--mot_steps`={args.mot_steps} must be an integer >= 1 given with --mot_run (the steps that run "
            "trained); the MoT run trained here has --max_steps steps."
        )


def mot_run_steps(args: argparse.Namespace) -> int:
    """The optimizer steps the MoT run trained: `--max_steps` for the one trained here; for a `--mot_run`,
    `--mot_steps` or the last step in its metrics.jsonl."""
    if not args.mot_run:
        return args.max_steps
    if args.mot_steps is not None:
        return args.mot_steps
    steps = [record["step"] for record in read_metrics(args.mot_run) if "step" in record]
    if not steps:
        raise ValueError(
            f"`--mot_run`={args.mot_run!r} has no metrics.jsonl with logged steps to read its step count from: "
            "pass --mot_steps N, the optimizer steps that run trained (an integer >= 1)."
        )
    return max(steps)


def data_arguments(args: argparse.Namespace) -> list[str]:
    """Corpus arguments shared by every run: the bundled corpus, or a few speeches in quick mode."""
    common = ["--block_size", str(args.block_size), "--max_eval_blocks", str(args.eval_blocks)]
    common += ["--per_device_train_batch_size", str(args.batch_size)]
    common += ["--per_device_eval_batch_size", str(args.batch_size), "--seed", str(args.seed)]
    common += ["--disable_tqdm", "true"]
    if not args.quick:
        return common
    files = sotu_speech_files()
    return common + ["--corpus", *map(str, files[100:103]), "--validation", str(files[-1]), "--vocab_size", "300"]


def train(
    output_dir: Path, argv: list[str], run: Callable[[ScriptArguments, MoTTrainingArguments], object] = run_training
) -> Path:
    """Train with the arguments `argv` into `output_dir` (resumed, or reused when finished) through `run`."""
    train_or_reuse(*parse_args(argv + ["--output_dir", str(output_dir)]), run=run)
    return output_dir


def mot_arguments(args: argparse.Namespace, steps: int) -> list[str]:
    """Arguments of the MoT run trained here and of its annealed twin, both `steps` long."""
    every = str(max(1, steps // 10))
    argv = ["--preset", "mot-tiny", "--max_steps", str(steps), "--eval_steps", every, "--save_steps", every]
    argv += ["--logging_steps", "10"] + data_arguments(args)
    return argv + (["--model", *QUICK_MODEL] if args.quick else [])


def validation_loss(run: Path, blocks: Dataset, batch_size: int, **kwargs: object) -> float:
    return evaluate_perplexity(load(run), blocks, batch_size, **kwargs)["mean_nll"]


def load(run: Path) -> MoTGPTForCausalLM:
    """A saved model for inference: no auxiliary loss (a tuning checkpoint's config still has it on)."""
    return AutoModelForCausalLM.from_pretrained(run, output_router_logits=False).eval()


@torch.no_grad()
def router_balance(model: MoTGPTForCausalLM, ids: torch.Tensor, batch_size: int) -> list[dict]:
    """For each Token Choice layer, on the tokens of `ids`: the busiest expert's share of the first choices over the
    uniform share, the number of experts that are nobody's first choice, and the rows a buffer sized by the busiest
    expert's load would make every expert multiply, over the k rows per token of sorted dispatch (what the layer
    cost before it dispatched sorted)."""
    per_batch = [model(batch, output_router_logits=True).router_logits for batch in ids.split(batch_size)]
    balance = []
    for layer_logits in map(torch.cat, zip(*per_batch, strict=True)):
        n_tokens, n_experts = layer_logits.shape
        k = model.config.num_experts_per_tok
        first = torch.bincount(layer_logits.argmax(-1), minlength=n_experts)
        load = torch.bincount(layer_logits.topk(k, dim=-1).indices.flatten(), minlength=n_experts)
        balance.append({
            "busiest_over_uniform": round(float(first.max()) * n_experts / n_tokens, 3),
            "idle_experts": int((first == 0).sum()),
            "padded_buffer_over_routed_rows": round(float(load.max()) * n_experts / (k * n_tokens), 3),
        })  # fmt: skip
    return balance


def balance_target_met(balances: list[list[dict]]) -> bool:
    """Every layer of every measured router: busiest expert at most 2x the uniform share, no expert idle."""
    return all(entry["busiest_over_uniform"] <= 2 and entry["idle_experts"] == 0 for run in balances for entry in run)


def prompts(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The first quarter of each block of `ids` as a prompt, and the number of tokens to generate after it."""
    prompt_len = ids.shape[1] // 4
    return ids[:, :prompt_len], ids.shape[1] - prompt_len


def expert_rows_per_assignment(model: MoTGPTForCausalLM, ids: torch.Tensor) -> dict[str, float]:
    """Rows the expert matmuls of `model` process (counted at transformers' `grouped_mm` experts kernel), over
    `num_experts_per_tok` times the
    tokens: in a training step (forward, whose rows the backward reuses, on `ids`) and in the decoding steps of
    cached generation from [`prompts`] of `ids`."""
    rows = []
    grouped_mm = moe._grouped_mm

    def counting(tokens: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        rows.append(int(offs[-1]))
        return grouped_mm(tokens, weight, offs)

    k, n_matmuls = model.config.num_experts_per_tok, 2 * len(model.config.mot_layer_indices)
    with mock.patch.object(moe, "_grouped_mm", counting):
        model.train()
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        training = sum(rows) / (n_matmuls * k * ids.numel())
        rows.clear()
        prompt, new_tokens = prompts(ids)
        model.eval()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decoding = sum(rows[n_matmuls:]) / (n_matmuls * k * ids.shape[0] * (new_tokens - 1))  # after the prompt
    return {"training": training, "decoding": decoding}


def speed(models: dict, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Training-step time (AdamW, interleaved, median) and greedy-generation tokens per second of each model, side by
    side, on held-out blocks; ratios to the dense twin."""
    device = "cpu"
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = make_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), ids)
    times, discarded = interleaved_times(steps, device, args.speed_repeats, warmup=1)
    step_ms = {name: statistics.median(t) for name, t in times.items()}
    prompt, new_tokens = prompts(ids)
    generation = {}
    for batch_size in (1, args.batch_size):
        # MoT mixes the rows of a group: a lone prompt would be a group of one, unlike training.
        names = [name for name in models if batch_size == args.batch_size or name != "mot"]
        seconds = {name: [] for name in names}
        for _ in range(1 + args.speed_repeats):  # interleaved; the first round is a warm-up
            for name in names:
                seconds[name].append(time_generation(models[name].eval(), prompt[:batch_size], new_tokens))
        generation[f"batch_{batch_size}"] = {
            name: batch_size * new_tokens / statistics.median(t[1:]) for name, t in seconds.items()
        }
    return {
        "train_step_ms": step_ms,
        "train_step_ratio_to_dense": {name: median_ratio(t, times["dense"]) for name, t in times.items()},
        "generation_tokens_per_second": generation,
        "generation_ratio_to_dense": {
            batch: {name: value / rates["dense"] for name, value in rates.items()}
            for batch, rates in generation.items()
        },
        "discarded_rounds": discarded,
        "new_tokens": new_tokens,
    }


def dense_twin(model: MoTGPTForCausalLM) -> MoTGPTForCausalLM:
    """The dense twin of a MoT model (its blocks with GPT-2's MLP, with the experts' activation so that only the layer
    differs), freshly initialized: for speed only."""
    fields = model.config.to_dict() | {"mot_layers": [], "activation_function": model.config.expert_activation}
    twin = MoTGPTForCausalLM(type(model.config)(**fields))
    # The saved config says use_cache=False (the Trainer's setting); decoding takes the generation config's, True.
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


def first_within_target(curve: list[tuple[int, float]], mot: float) -> int | None:
    """The first tuning step whose validation loss is within the target of the MoT model's."""
    return next((step for step, loss in curve if loss <= mot * (1 + TARGET)), None)


def plot(results: dict, path: Path) -> None:
    """Top: validation loss along the MoT and annealed runs with the transition after them, and the tuning steps
    against the MoT model's loss and the 2% target. Bottom: the busiest expert's share of first choices along tuning
    (each layer; the uncalibrated conversion at step 0 for comparison), and step time and generation speed against
    the dense twin."""
    plt = pyplot()

    loss, mot_steps = results["validation_loss"], results["mot_steps"]
    tuning = results["tuning_curve"]
    fig, ((left, right), (balance, speeds)) = plt.subplots(2, 2, figsize=(12, 9))
    for key, style, label in (("mot_curve", "C0o-", "MoT"), ("annealed_curve", "C2o-", "MoT, T annealed to 0")):
        if results[key]:  # a given --mot_run may have no evaluations logged
            left.plot(*zip(*results[key], strict=True), style, label=label)
    left.plot([mot_steps + step for step, _ in tuning], [value for _, value in tuning], "C1.-", label="Token Choice")
    if "annealed_t0" in loss:  # absent with --skip_annealing
        left.plot([mot_steps], [loss["annealed_t0"]], "C2*", markersize=12, label="annealed, served at T = 0")
    left.set_title("validation loss along training")
    left.set_xlabel("step")
    right.plot(*zip(*tuning, strict=True), "C1o-", label="converted to Token Choice, tuning")
    right.plot([tuning[-1][0]], [loss["tuned"]], "C1*", markersize=12, label=f"router recalibrated {loss['tuned']:.3f}")
    right.axhline(loss["mot"], color="C0", label=f"MoT {loss['mot']:.3f}")
    right.axhline(loss["mot"] * (1 + TARGET), color="C0", linestyle="--", label="MoT + 2% (target)")
    if "annealed_t0" in loss:
        annealed = loss["annealed_t0"]
        right.axhline(annealed, color="C2", linestyle=":", label=f"annealed at T = 0 {annealed:.3f}")
    right.set_title(f"transition tuning ({results['tuning_steps']} steps = 10% of {mot_steps})")
    right.set_xlabel("transition-tuning step")
    for ax in (left, right):
        ax.set_ylabel("cross-entropy (nats/token)")
    steps = [step for step, _ in results["balance_curve"]]
    for layer, layers in enumerate(zip(*(per_layer for _, per_layer in results["balance_curve"]), strict=True)):
        shares = [entry["busiest_over_uniform"] for entry in layers]
        balance.plot(steps, shares, f"C{layer}o-", label=f"layer {results['mot_layers'][layer]}")
        uncalibrated = results["balance_uncalibrated"][layer]["busiest_over_uniform"]
        balance.plot([0], [uncalibrated], f"C{layer}x", markersize=9)
        balance.plot(
            [steps[-1]], [results["balance_tuned"][layer]["busiest_over_uniform"]], f"C{layer}*", markersize=11
        )
    balance.axhline(2.0, color="gray", linestyle="--", label="target: 2x the uniform share")
    balance.set_yscale("log")
    balance.set_title(
        "busiest expert's first choices / uniform share (x: no router bias, *: recalibrated)", fontsize=10
    )
    balance.set_xlabel("transition-tuning step")
    speed_results, names = results["speed"], list(results["speed"]["train_step_ms"])
    groups = {"training step time": speed_results["train_step_ratio_to_dense"]}
    for batch, ratios in speed_results["generation_ratio_to_dense"].items():
        groups[f"generation tokens/s, {batch.replace('_', ' ')}"] = ratios
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        bars = [(j + (i - (len(names) - 1) / 2) * width, ratios[name]) for j, ratios in enumerate(groups.values())
                if name in ratios]  # fmt: skip
        speeds.bar_label(speeds.bar(*zip(*bars, strict=True), width, label=name), fmt="%.2f", fontsize=8)
    speeds.set_xticks(range(len(groups)), list(groups), fontsize=8)
    speeds.axhline(1.0, color="gray", lw=1)
    speeds.set_title("over the dense twin: step time (lower is better), tokens/s (higher)", fontsize=10)
    for ax in (left, right, balance, speeds):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tuning_arguments(args: argparse.Namespace, mot_run: Path, tuning_steps: int) -> list[str]:
    """Transition tuning for `tuning_steps`, a checkpoint every `--tune_eval_every` steps (the benchmark evaluates
    them itself: the Trainer's evaluation loss would include the balancing loss)."""
    every = str(args.tune_eval_every)
    argv = TRANSITION_DEFAULTS + ["--model_name_or_path", str(mot_run), "--max_steps", str(tuning_steps)]
    argv += ["--eval_strategy", "no", "--logging_steps", every, "--save_steps", every]
    return argv + ["--save_total_limit", str(tuning_steps)] + data_arguments(args)


def serving_domain_files(
    validation: Dataset, tokenizer: PreTrainedTokenizerBase, skip_tokens: int, folder: Path
) -> list[str]:
    """The held-out speeches that start after the first `skip_tokens` tokens of the packed validation text (the
    blocks scored for loss and balance), one per file in `folder`: calibration text of the domain the model is
    measured on, disjoint from what is measured."""
    folder.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for index, text in enumerate(validation["text"]):
        if start >= skip_tokens:
            files.append(folder / f"speech-{index:02d}.txt")
            files[-1].write_text(text)
        start += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # pack ends each document with EOS
    return [str(path) for path in files]


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint of `run`, in step order."""
    found = [(int(folder.name.split("-")[-1]), folder) for folder in run.glob("checkpoint-*")]
    return sorted(found)


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_args(argv)
    torch.manual_seed(args.seed)
    runs, started = Path(args.runs_dir), time.time()
    mot_steps = mot_run_steps(args)  # before any training: a --mot_run without a step count is refused
    mot_run = Path(args.mot_run) if args.mot_run else train(runs / "mot", mot_arguments(args, mot_steps))
    tuning_steps = max(1, round(args.tune_fraction * mot_steps))
    tokenizer = AutoTokenizer.from_pretrained(mot_run)
    validation = load_text([str(sotu_speech_files()[-1])]) if args.quick else load_sotu()["validation"]
    blocks = head(pack(validation, tokenizer, args.block_size), args.eval_blocks)
    ids = torch.tensor(head(blocks, args.balance_blocks)["input_ids"])

    tuned = train(
        runs / "token-choice",
        tuning_arguments(args, mot_run, tuning_steps),
        run=lambda script, training: run_transition_tuning(script, training, TransitionArguments()),
    )
    annealed = None
    if not args.skip_annealing:  # the twin of the MoT run trained here: same arguments and steps, annealed
        annealed = train(runs / "mot-annealed", mot_arguments(args, mot_steps) + ["--anneal_temperature", "true"])

    print("[transition] evaluating")
    uncalibrated = mot_to_token_choice(load(mot_run))
    loss = {
        "mot": validation_loss(mot_run, blocks, args.batch_size),
        "mot_t0": validation_loss(mot_run, blocks, args.batch_size, router_temperature=0.0),
        "uncalibrated_switch": evaluate_perplexity(uncalibrated, blocks, args.batch_size)["mean_nll"],
        "after_switch": validation_loss(tuned / "converted", blocks, args.batch_size),
        "tuned": validation_loss(tuned, blocks, args.batch_size),
    }
    if annealed is not None:
        loss["annealed_t0"] = validation_loss(annealed, blocks, args.batch_size, router_temperature=0.0)
    tuning_curve = [(0, loss["after_switch"])]
    balance_curve = [(0, router_balance(load(tuned / "converted"), ids, args.batch_size))]
    for step, checkpoint in checkpoints(tuned):
        tuning_curve.append((step, validation_loss(checkpoint, blocks, args.batch_size)))
        balance_curve.append((step, router_balance(load(checkpoint), ids, args.batch_size)))
    # Each block alone (a group of one): MoT changes, the Token Choice model gives its batch loss again.
    alone = head(blocks, 64)
    loss_alone = {
        "mot": validation_loss(mot_run, alone, args.batch_size, grouping="single"),
        "mot_batch": validation_loss(mot_run, alone, args.batch_size),
        "tuned": validation_loss(tuned, alone, args.batch_size, grouping="single"),
        "tuned_batch": validation_loss(tuned, alone, args.batch_size),
    }
    balanced = [balance_curve[0][1], router_balance(load(tuned), ids, args.batch_size)]
    # The same tuning, its router calibrated on held-out speeches that are not measured (`--calibration_corpus`).
    domain = None
    domain_files = serving_domain_files(validation, tokenizer, len(blocks) * args.block_size, runs / "domain-text")
    if domain_files:
        transition = TransitionArguments(calibration_corpus=domain_files)
        domain_run = train(
            runs / "token-choice-domain",
            tuning_arguments(args, mot_run, tuning_steps),
            run=lambda script, training: run_transition_tuning(script, training, transition),
        )
        domain_balance = [router_balance(load(domain_run / name), ids, args.batch_size) for name in ("converted", "")]
        domain = {
            "calibration_speeches": len(domain_files),
            "validation_loss": {
                "after_switch": validation_loss(domain_run / "converted", blocks, args.batch_size),
                "tuned": validation_loss(domain_run, blocks, args.batch_size),
            },
            "balance_converted": domain_balance[0],
            "balance_tuned": domain_balance[1],
            "balance_target_met": balance_target_met(domain_balance),
        }
    print("[transition] measuring compute and speed")
    speed_ids = ids[: args.batch_size]
    models = {"dense": dense_twin(load(mot_run)), "mot": load(mot_run), "token_choice": load(tuned)}
    results = {
        "mot_run": str(mot_run),
        "mot_steps": mot_steps,
        "tuning_steps": tuning_steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "eval_blocks": len(blocks),
        "balance_blocks": len(ids),
        "calibration_blocks": TransitionArguments().calibration_blocks,
        "mot_layers": models["token_choice"].config.mot_layer_indices,
        "validation_loss": loss,
        "tuned_relative_to_mot": loss["tuned"] / loss["mot"] - 1,
        "target_met": loss["tuned"] <= loss["mot"] * (1 + TARGET),
        "first_step_within_target": first_within_target(tuning_curve, loss["mot"]),
        "tuning_curve": tuning_curve,
        "balance_uncalibrated": router_balance(uncalibrated, ids, args.batch_size),
        "balance_curve": balance_curve,
        "balance_tuned": balanced[1],
        "balance_target_met": balance_target_met(balanced),
        "domain_calibrated": domain,
        "expert_rows_per_assignment": expert_rows_per_assignment(load(tuned), speed_ids),
        "speed": speed(models, speed_ids, args),
        "first_64_blocks_alone_vs_batched": loss_alone,
        "mot_curve": validation_curve(mot_run),
        "annealed_curve": validation_curve(annealed) if annealed is not None else [],
        "seconds": round(time.time() - started, 1),
        "machine": machine_info(),
    }
    out = Path(args.out)
    write_json(rounded(results), out)
    plot(results, out.with_suffix(".png"))
    summary = ("validation_loss", "tuned_relative_to_mot", "target_met", "balance_target_met")
    print(json.dumps({key: results[key] for key in summary}))
    return results


if __name__ == "__main__":
    main()
