"""Perplexity of a causal LM on packed blocks, with MoT's grouping made explicit: `mot-evaluate`.

    mot-evaluate runs/mot-tiny
    mot-evaluate runs/mot-tiny --grouping batch single fillers --router_temperature 0

A MoT model's output for one row depends on the other rows of its group, so how evaluation rows are grouped is part
of the result:

- `batch`: consecutive blocks form groups, as in training (the default).
- `single`: every block alone, a group of one (what a lone request sees).
- `fillers`: every block in a group with `group_size - 1` filler blocks (e.g. training text) whose own predictions
  are not counted: the paper's recipe for evaluating one sequence with training-like group statistics.
"""

import argparse
import json
from pathlib import Path

import evaluate
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from .data import load_kjv, load_sotu, load_text, pack, sample_blocks
from .modeling_mot import isolated_groups

GROUPINGS = ("batch", "single", "fillers")
METRIC_PATH = Path(__file__).parent / "metrics" / "perplexity" / "perplexity.py"


def load_perplexity_metric() -> evaluate.EvaluationModule:
    """The repository's perplexity metric, loaded by path (works offline)."""
    return evaluate.load(str(METRIC_PATH))


def block_nll(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Summed next-token NLL of each row of `input_ids`, `(batch,)`, in float64."""
    logits = model(input_ids, **kwargs).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll.sum(dim=-1)


@torch.no_grad()
def evaluate_perplexity(
    model,
    blocks: Dataset,
    batch_size: int = 32,
    grouping: str = "batch",
    fillers: Dataset | None = None,
    router_temperature: float | None = None,
) -> dict:
    """Perplexity of `model` on `blocks` (a dataset of equal-length `input_ids`), computed by the `evaluate` metric.

    `batch_size` rows go through the model at once with `grouping="batch"`; `"single"` and `"fillers"` put each block
    in a group of its own (see the module docstring). With `"batch"` a model with groups is evaluated on full groups
    only: the last `len(blocks) % group_size` blocks, which would form a smaller group, are left out (the returned
    token count says how many tokens were scored). Returns perplexity, mean NLL and the token count.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"`grouping` must be one of {GROUPINGS}, got {grouping!r}.")
    if grouping == "fillers" and fillers is None:
        raise ValueError("`grouping='fillers'` needs `fillers`: a dataset of blocks to fill each group with.")
    group_size = getattr(model.config, "group_size", 1)
    if grouping == "batch" and getattr(model.config, "uses_groups", False) and batch_size % group_size:
        raise ValueError(
            f"`batch_size`={batch_size} is not a multiple of the model's group_size={group_size}: the result would "
            "depend on the batch size through partial groups. Choose a multiple of group_size."
        )
    kwargs = {} if router_temperature is None else {"router_temperature": router_temperature}
    model.eval()
    metric = load_perplexity_metric()
    ids = torch.tensor(blocks["input_ids"], device=model.device)
    if grouping == "batch" and getattr(model.config, "uses_groups", False):
        ids = ids[: len(ids) - len(ids) % group_size]
        if len(ids) == 0:
            raise ValueError(
                f"`blocks` holds {len(blocks)} blocks, fewer than one full group of group_size={group_size}; "
                "evaluate more blocks or use grouping='fillers'."
            )
    step = batch_size if grouping == "batch" else 1
    if grouping == "fillers":
        n_fill = group_size - 1
        filler_ids = torch.tensor(fillers["input_ids"][:n_fill], device=model.device) if n_fill else ids[:0]
        if filler_ids.shape != (n_fill, ids.shape[1]):
            raise ValueError(
                f"`fillers` must hold at least group_size - 1 = {n_fill} blocks of {ids.shape[1]} tokens, "
                f"got {tuple(filler_ids.shape)}."
            )
    for start in range(0, len(ids), step):
        batch = ids[start : start + step]
        if grouping == "fillers":
            nll = block_nll(model, isolated_groups(batch, filler_ids, group_size)[0], **kwargs)[:1]
        else:
            nll = block_nll(model, batch, **kwargs)
        metric.add_batch(nll_sums=nll.tolist(), token_counts=[batch.shape[1] - 1] * len(batch))
    return metric.compute()


def evaluate_on_corpora(
    model,
    tokenizer,
    block_size: int,
    batch_size: int,
    groupings: tuple[str, ...] = ("batch",),
    max_blocks: int | None = 512,
    router_temperature: float | None = None,
    data_cache_dir: str | None = None,
    extra_text: Dataset | None = None,
) -> dict:
    """Perplexity on the held-out State of the Union speeches (`validation`), the King James Bible (`kjv`, out of
    domain) and optionally `extra_text`, for each grouping; fillers are the first training blocks."""
    sotu = load_sotu()
    corpora = {"validation": sotu["validation"], "kjv": load_kjv()}
    if extra_text is not None:
        corpora["text"] = extra_text
    fillers = pack(sotu["train"], tokenizer, block_size, data_cache_dir) if "fillers" in groupings else None
    results = {"block_size": block_size, "batch_size": batch_size, "router_temperature": router_temperature}
    for name, text in corpora.items():
        blocks = sample_blocks(pack(text, tokenizer, block_size, data_cache_dir), max_blocks)
        results[name] = {
            grouping: evaluate_perplexity(model, blocks, batch_size, grouping, fillers, router_temperature)
            for grouping in groupings
        }
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mot-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="checkpoint folder or Hub name (with its tokenizer)")
    parser.add_argument("--text", nargs="+", help="also evaluate on these .txt files or dataset folder")
    parser.add_argument("--block_size", type=int, help="tokens per block (default: the model's n_positions)")
    parser.add_argument("--batch_size", type=int, help="rows per forward pass (default: the model's group_size)")
    parser.add_argument(
        "--max_blocks",
        type=int,
        default=512,
        help="blocks per corpus, in a fixed shuffled order (default 512; 0 = all)",
    )
    parser.add_argument("--grouping", nargs="+", default=["batch"], choices=GROUPINGS)
    parser.add_argument("--router_temperature", type=float, help="MoT temperature for this evaluation")
    parser.add_argument("--data_cache_dir", default=".cache/mot-data")
    parser.add_argument("--output", help="JSON results file (default: MODEL/eval_results.json)")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Load the checkpoint `args.model` and its tokenizer and evaluate them as `args` says."""
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return {"model": str(args.model)} | evaluate_on_corpora(
        model,
        tokenizer,
        block_size=args.block_size or model.config.n_positions,
        batch_size=args.batch_size or getattr(model.config, "group_size", 8),
        groupings=tuple(args.grouping),
        max_blocks=args.max_blocks,
        router_temperature=args.router_temperature,
        data_cache_dir=args.data_cache_dir,
        extra_text=load_text(args.text) if args.text else None,
    )


def main(argv: list[str] | None = None) -> None:
    """`mot-evaluate`: write the results to `--output` (default MODEL/eval_results.json) and print them."""
    args = parse_args(argv)
    results = evaluate_checkpoint(args)
    output = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
