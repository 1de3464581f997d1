"""Does MoT turn its G-fold parameters into capacity, as sparse MoE does? A knowledge-capacity test.

A benchmark, not a test. Stored knowledge, not optimization steps, is the bottleneck here: N random facts, each a
key of `--key_len` tokens -> a value of `--value_len` tokens, over a vocabulary of `--symbols` symbols (plus BOS and
a separator). A row is BOS, key, separator, value: short rows, cheap on a CPU. Every model trains on the facts for
`--epochs` epochs (each epoch every fact once, in a new order), with the loss on the value tokens only. Seeing each
fact many times is the point of this test: it measures what a model can store, not how it generalizes.

Models (`common.VARIANTS` on the `tiny` backbone's groups, G 16, resized to `--n_layer`, `--n_embd`, `--n_head`): the
dense model, MoT k 16 at T 1 and T 0.1, dropless Token Choice (top-1, top-2) and Expert Choice with the authors'
output normalization under one training (`mot-train`'s defaults at `--learning_rate`), then the dense twins and MoT of
the authors' recipes (`poc`, `medium`) at T 1 and T 0.1 with their recipe's training fields (weight decay, warm-up,
schedule, clipping, learning rate); all at the dense MLP's expert FLOPs per token. The default rate, 3e-3, is the
better of 3e-3 and 1e-2 for the dense model (at N 4000 after 300 epochs it recalled 484 facts at 3e-3, 94 at 1e-2);
it is not tuned per model.

Scoring rule. A fact is recalled when every value token is the model's argmax given the key and the value tokens
before it (teacher forcing: for a model whose rows do not interact, exactly the facts that greedy decoding
completes). The probes are scored in full groups of G rows, as the model trained: all N facts in their fixed order,
in batches of `--batch_size` rows, the last group completed with the first facts again (each fact counted once).
Bits stored: facts recalled x value_len x log2(symbols), per parameter (without the embeddings, which are tiny here).

    python benchmarks/capacity.py                                         # every variant at N 1000, 2000, 4000
    python benchmarks/capacity.py --n_facts 4000 --variants dense_poc mot_poc
    python benchmarks/capacity.py --quick                                 # tiny and fast, for a smoke test
    python benchmarks/capacity.py --summary                               # rebuild the summary, train nothing

Each finished run writes its compact JSON to `--curves_dir` (committed), named by variant, N and seed; a run whose
file exists is skipped (one recorded with other settings is refused), and the summary (`--out` JSON and PNG) is
rebuilt from those files alone.
"""

import argparse
import json
import math
import time
from dataclasses import MISSING
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
from transformers import get_scheduler

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.card import flops_per_token, parameter_counts
from mixture_of_tokens.trainer import decay_parameter_names
from mixture_of_tokens.training import MoTTrainingArguments

BOS, SEP, SPECIALS = 0, 1, 2
MAX_KEYS = 2**24  # keys are drawn without replacement from all symbols^key_len of them
# First every model under the same training (`mot-train`'s defaults at `--learning_rate`), then the authors' recipes.
# At d 32, MoT k 16's controller and mixing (about 3 * E * d per token and layer, E 256) cost 2.8 times the dense
# model's FLOPs; MoT k 1 (E 16 experts as wide as the dense MLP: the same expert parameters) costs 1.1 times.
DEFAULT_VARIANTS = ("dense", "mot_k16", "mot_k16_t0.1", "mot_k1", "token_choice_top1", "token_choice_top2",
                    "expert_choice_norm", "expert_choice_norm_top2", "dense_poc", "mot_poc", "mot_poc_t0.1",
                    "dense_medium", "mot_medium", "mot_medium_t0.1")  # fmt: skip
QUICK = {"n_facts": [32, 64], "epochs": 20, "evals": 2, "n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 32,
         "variants": ["dense_poc", "mot_poc", "token_choice_top1", "expert_choice_norm_top2"]}  # fmt: skip
# Training fields a recipe may set; a variant without a recipe takes `mot-train`'s defaults for them.
TRAINING_KEYS = ("weight_decay", "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "max_grad_norm")
SETTINGS = ("key_len", "value_len", "symbols", "epochs", "batch_size", "n_layer", "n_embd", "n_head", "learning_rate",
            "evals", "device")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_facts", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed of the facts and of the model")
    parser.add_argument("--key_len", type=int, default=4)
    parser.add_argument("--value_len", type=int, default=4)
    parser.add_argument("--symbols", type=int, default=32, help="symbols that keys and values are drawn from")
    parser.add_argument("--epochs", type=int, default=300, help="passes over the facts")
    parser.add_argument("--evals", type=int, default=5, help="recall measured this many times, evenly in training")
    parser.add_argument("--batch_size", type=int, default=64, help="rows per step, a multiple of the group size")
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=32)
    parser.add_argument("--n_head", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="of the variants without a recipe")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--curves_dir", help="one JSON per finished run (default: results/capacity)")
    parser.add_argument("--out", help="summary JSON and PNG (default: results/capacity.json)")
    parser.add_argument("--summary", action="store_true", help="rebuild the summary from the run files only")
    parser.add_argument("--quick", action="store_true", help="tiny models and few facts, into runs/capacity-quick")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)  # what the command line gives still wins
    args = parser.parse_args(argv)
    results = Path("runs/capacity-quick") if args.quick else RESULTS
    args.curves_dir = args.curves_dir or str(results / "capacity")
    args.out = args.out or str(results / "capacity.json")
    return args


def make_facts(n_facts: int, args: argparse.Namespace, seed: int) -> torch.Tensor:
    """`(n_facts, 2 + key_len + value_len)` rows BOS, key, SEP, value: distinct random keys (a key with two values
    could not be recalled twice), random values."""
    keys_possible = args.symbols**args.key_len
    if not n_facts <= keys_possible <= MAX_KEYS:
        raise ValueError(
            f"`n_facts`={n_facts} must be at most the symbols^key_len = {args.symbols}^{args.key_len} = "
            f"{keys_possible} distinct keys, which must be at most {MAX_KEYS}: choose other --symbols or --key_len."
        )
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randperm(keys_possible, generator=generator)[:n_facts]
    keys = codes[:, None] // args.symbols ** torch.arange(args.key_len - 1, -1, -1) % args.symbols + SPECIALS
    values = torch.randint(SPECIALS, SPECIALS + args.symbols, (n_facts, args.value_len), generator=generator)
    column = torch.ones(n_facts, 1, dtype=torch.long)
    return torch.cat([column * BOS, keys, column * SEP, values], dim=1)


def value_start(facts: torch.Tensor, value_len: int) -> int:
    return facts.shape[1] - value_len


def wrapped(order: torch.Tensor, multiple: int) -> torch.Tensor:
    """`order` continued from its start up to a multiple of `multiple` entries: batches of whole groups, where every
    row is a real fact."""
    return order[torch.arange(len(order) + -len(order) % multiple) % len(order)]


@torch.no_grad()
def recalled(model: MoTGPTForCausalLM, facts: torch.Tensor, value_len: int, batch_size: int) -> torch.Tensor:
    """`(n_facts,)` bool: whether each fact's value tokens are all the model's argmax under teacher forcing, the facts
    scored in their order in batches of `batch_size` rows (a multiple of the group size), the last batch completed
    with the first facts again (each fact counted once)."""
    start, hits = value_start(facts, value_len), []
    model.eval()
    for batch in wrapped(torch.arange(len(facts)), batch_size).split(batch_size):
        rows = facts[batch].to(model.device)
        predicted = model(rows).logits[:, start - 1 : -1].argmax(dim=-1)
        hits.append((predicted == rows[:, start:]).all(dim=-1).cpu())
    return torch.cat(hits)[: len(facts)]


def training_fields(spec: dict) -> dict:
    """The variant's recipe training fields, else `mot-train`'s defaults (`MoTTrainingArguments`)."""
    fields = MoTTrainingArguments.__dataclass_fields__
    default = {key: fields[key].default for key in TRAINING_KEYS}
    default |= {key: fields[key].default_factory() for key, value in default.items() if value is MISSING}
    return default | {key: value for key, value in spec["training"].items() if key in TRAINING_KEYS}


def optimizer_for(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with `mot-train`'s weight-decay exemptions (`MoTTrainer`'s rule: biases, norms, learned temperatures)."""
    decay = set(decay_parameter_names(model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate)


def model_spec(variant: str, args: argparse.Namespace) -> dict:
    """The variant's spec on the tiny backbone's groups, resized to the benchmark's blocks and width."""
    spec = variant_config(variant, "tiny")
    spec["overrides"] |= {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head}
    return spec


def train_run(variant: str, n_facts: int, seed: int, args: argparse.Namespace) -> dict:
    """Train one model on `n_facts` facts for `--epochs` epochs, measuring recall `--evals` times; its record."""
    facts = make_facts(n_facts, args, seed)
    spec, device = model_spec(variant, args), torch.device(args.device)
    torch.manual_seed(seed)
    model = variant_model(spec, SPECIALS + args.symbols, facts.shape[1]).to(device)
    group_size = model.config.group_size
    if args.batch_size % group_size:
        raise ValueError(f"`batch_size`={args.batch_size} must be a multiple of the group size {group_size}.")
    training = training_fields(spec)
    learning_rate = spec["training"].get("learning_rate", args.learning_rate)
    steps_per_epoch = math.ceil(n_facts / args.batch_size)
    steps = args.epochs * steps_per_epoch
    optimizer = optimizer_for(model, learning_rate, training["weight_decay"])
    warmup = training["warmup_steps"]  # below 1: a fraction of the steps, as in `TrainingArguments`
    warmup_steps = math.ceil(warmup * steps) if warmup < 1 else int(warmup)
    scheduler = get_scheduler(training["lr_scheduler_type"], optimizer, warmup_steps, steps,
                              scheduler_specific_kwargs=training["lr_scheduler_kwargs"])  # fmt: skip
    eval_at = {round(steps * (i + 1) / args.evals) for i in range(args.evals)}
    generator, start, curve, step = torch.Generator().manual_seed(seed), value_start(facts, args.value_len), [], 0
    tick = time.time()
    for _ in range(args.epochs):
        for batch in wrapped(torch.randperm(n_facts, generator=generator), args.batch_size).split(args.batch_size):
            model.train()
            rows = facts[batch].to(device)
            labels = rows.masked_fill(torch.arange(rows.shape[1], device=device) < start, -100)
            model(rows, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step in eval_at:
                curve.append([step, int(recalled(model, facts, args.value_len, args.batch_size).sum())])
    total, _ = parameter_counts(model)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    bits_per_fact = args.value_len * math.log2(args.symbols)
    return {"run": run_name(variant, n_facts, seed), "variant": variant, "n_facts": n_facts, "seed": seed, **spec,
            "learning_rate": learning_rate, "training_fields": training, "steps": steps, "epochs": args.epochs,
            "repeats_text": True, "facts_recalled_curve": curve, "facts_recalled": curve[-1][1],
            "bits_per_fact": bits_per_fact, "bits_stored": curve[-1][1] * bits_per_fact, "parameters": total,
            "non_embedding_parameters": total - embeddings,
            "bits_per_non_embedding_parameter": curve[-1][1] * bits_per_fact / (total - embeddings),
            "flops_per_token": flops_per_token(model), "settings": settings(args),
            "expert_choice_unprocessed": expert_choice_unprocessed(model, facts[wrapped(torch.arange(n_facts),
                                                                                        args.batch_size)]),
            "training_seconds": round(time.time() - tick, 1), "machine": machine_info()}  # fmt: skip


def run_name(variant: str, n_facts: int, seed: int) -> str:
    return f"{variant}-n{n_facts}-s{seed}"


def settings(args: argparse.Namespace) -> dict:
    """The settings that change what a run computes, besides its variant, N and seed."""
    return {key: getattr(args, key) for key in SETTINGS}


def train_or_load(variant: str, n_facts: int, seed: int, args: argparse.Namespace) -> dict:
    """A run's record: read from its file if it finished (refused if made with other settings), else trained."""
    path = Path(args.curves_dir) / f"{run_name(variant, n_facts, seed)}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record["settings"] != settings(args):
            raise ValueError(
                f"the committed run {path} was made with other settings ({record['settings']}, now "
                f"{settings(args)}): give another --curves_dir, or delete that file to train the run again."
            )
        return record
    print(f"[capacity] {variant}: {n_facts} facts, seed {seed}", flush=True)
    record = train_run(variant, n_facts, seed, args)
    write_json(record, path)
    return record


def summarize(records: list[dict]) -> dict:
    """Per variant, for each N (mean over seeds): facts recalled, their fraction, bits stored per non-embedding
    parameter and facts recalled during training (step, facts); and the largest number of facts recalled at any N
    (the model's measured capacity)."""
    summary = {}
    for record in sorted(records, key=lambda r: (r["variant"], r["n_facts"], r["seed"])):
        entry = summary.setdefault(record["variant"], {"by_n": {}})
        entry |= {key: record[key] for key in ("non_embedding_parameters", "flops_per_token")}
        entry["by_n"].setdefault(str(record["n_facts"]), []).append(record)
    for entry in summary.values():
        for n, runs in entry["by_n"].items():
            recalled_facts = sum(r["facts_recalled"] for r in runs) / len(runs)
            entry["by_n"][n] = {"facts_recalled": recalled_facts, "fraction_recalled": recalled_facts / int(n),
                                "bits_per_non_embedding_parameter": sum(r["bits_per_non_embedding_parameter"]
                                                                        for r in runs) / len(runs),
                                "facts_recalled_curve": mean_curve([r["facts_recalled_curve"] for r in runs]),
                                "seeds": [r["seed"] for r in runs]}  # fmt: skip
        entry["most_facts_recalled"] = max(row["facts_recalled"] for row in entry["by_n"].values())
    return summary


def plot(summary: dict, epochs: int, path: Path) -> None:
    plt = pyplot()
    fig, (facts_ax, bits_ax, steps_ax) = plt.subplots(1, 3, figsize=(18, 4.5))
    for index, (variant, entry) in enumerate(summary.items()):
        ns = sorted(entry["by_n"], key=int)
        facts_ax.plot([int(n) for n in ns], [entry["by_n"][n]["facts_recalled"] for n in ns], marker="o",
                      color=colour(index), label=variant)  # fmt: skip
        bits_ax.plot([int(n) for n in ns], [entry["by_n"][n]["bits_per_non_embedding_parameter"] for n in ns],
                     marker="o", color=colour(index), label=variant)  # fmt: skip
        # During training, at the variant's largest N; the last measurement is at the end of the last epoch.
        curve = entry["by_n"][ns[-1]]["facts_recalled_curve"]
        steps_ax.plot([step * epochs / curve[-1][0] for step, _ in curve], [facts / int(ns[-1]) for _, facts in curve],
                      marker="o", color=colour(index), label=f"{variant} (N {ns[-1]})")  # fmt: skip
    if summary:
        largest = max(int(n) for entry in summary.values() for n in entry["by_n"])
        facts_ax.plot([0, largest], [0, largest], color="gray", ls=":", label="every fact")
    facts_ax.set_ylabel("facts recalled (exact match)")
    bits_ax.set_ylabel("bits stored per non-embedding parameter")
    facts_ax.set_xlabel("facts trained on (N)")
    bits_ax.set_xlabel("facts trained on (N)")
    steps_ax.set_ylabel("fraction of the facts recalled")
    steps_ax.set_xlabel("epochs trained (each fact seen once an epoch)")
    steps_ax.set_title("during training, at each model's largest N")
    for ax in (facts_ax, bits_ax, steps_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.summary:
        for seed in args.seeds:
            for n_facts in args.n_facts:
                for variant in args.variants:
                    train_or_load(variant, n_facts, seed, args)
    records = [json.loads(path.read_text()) for path in sorted(Path(args.curves_dir).glob("*.json"))]
    results = {
        "benchmark": "facts recalled (exact match, full groups) after many epochs on N random facts",
        "settings": settings(args) | {"repeats_text": True},
        "summary": summarize(records),
    }
    out = Path(args.out)
    write_json(results, out)
    plot(results["summary"], args.epochs, out.with_suffix(".png"))
    for variant, entry in results["summary"].items():
        print(f"[capacity] {variant:24s} most facts recalled {entry['most_facts_recalled']:.0f}")
    return results


if __name__ == "__main__":
    main()
