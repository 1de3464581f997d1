"""Filler banks: rows of training text that complete a MoT group around requests that arrive alone, and the
`mot-fillers` command that adds one to a checkpoint.

A MoT model's output for one row depends on the other rows of its group. To score or decode a single request with
the group statistics the model was trained with, the paper places it in a group with `group_size - 1` training
sequences ("fillers") and reads only its own row. The bank is part of the model (`model.group_fillers`):
`from_pretrained` reads the checkpoint's `group_fillers.json`, `save_pretrained` writes it, and `generate`,
evaluation, lm-eval and `mot-serve` use it (see `mixture_of_tokens.modeling_mot`, where the file format lives, since
a checkpoint's remote code must read it without this package). `mot-train` gives its model a bank of training blocks;
`mot-fillers` builds one for any checkpoint (one saved by `Trainer`, TRL or a PEFT merge of a model without a bank):

    mot-fillers runs/my-model --text notes/*.txt
    mot-fillers runs/my-model --dataset json --data_files train.jsonl --text_column text
"""

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from .data import load_text, pack
from .modeling_mot import save_filler_bank


def build_filler_bank(blocks: Iterable[Sequence[int]], n_rows: int, eos_token_id: int | None) -> torch.LongTensor:
    """The first `n_rows` of `blocks` (equal-length token id rows, e.g. packed training blocks) that hold no
    `eos_token_id`, as a `(n_rows, block_len)` tensor. Raises `ValueError` when fewer such blocks exist."""
    if n_rows < 1:
        raise ValueError(f"`n_rows` must be >= 1, got {n_rows}.")
    rows = []
    for block in blocks:
        if eos_token_id is None or eos_token_id not in block:
            rows.append(list(block))
            if len(rows) == n_rows:
                return torch.tensor(rows, dtype=torch.long)
    raise ValueError(
        f"only {len(rows)} blocks without the EOS id {eos_token_id} were found, {n_rows} are needed as fillers: "
        "give longer documents or a shorter block size."
    )


def spread_filler_bank(blocks: Dataset, n_rows: int, eos_token_id: int | None) -> torch.LongTensor:
    """[`build_filler_bank`] from candidates spread over the packed `blocks` (four per row needed: some hold an EOS),
    so that the fillers come from all over the corpus rather than from its first document."""
    stride = max(1, len(blocks) // (4 * n_rows))
    return build_filler_bank(blocks.select(range(0, len(blocks), stride))["input_ids"], n_rows, eos_token_id)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mot-fillers",
        description="Build a filler bank from text with a checkpoint's tokenizer and write it into the checkpoint "
        "(group_fillers.json), so that generate, pipeline, lm-eval and mot-serve complete its MoT groups.",
    )
    parser.add_argument("checkpoint", help="a MoTGPT checkpoint folder with its tokenizer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="'sotu', 'kjv', .txt files or save_to_disk folders")
    source.add_argument("--dataset", help="a `datasets.load_dataset` name or builder ('json', 'text', 'parquet')")
    parser.add_argument("--data_files", nargs="+", help="with --dataset: its data files")
    parser.add_argument("--split", default="train", help="with --dataset: the split (default: train)")
    parser.add_argument("--text_column", default="text", help="with --dataset: the column holding text")
    parser.add_argument("--length", type=int, help="tokens per filler row (default: the model's n_positions)")
    parser.add_argument("--rows", type=int, help="filler rows (default and minimum: group_size - 1)")
    return parser.parse_args(argv)


def load_source_text(args: argparse.Namespace) -> Dataset:
    """The text `args` name, as a dataset with a 'text' column."""
    if args.text:
        return load_text(args.text)
    dataset = load_dataset(args.dataset, data_files=args.data_files, split=args.split)
    if args.text_column not in dataset.column_names:
        raise ValueError(
            f"`--text_column` {args.text_column!r} is not a column of the dataset: {dataset.column_names}."
        )
    return dataset.select_columns([args.text_column]).rename_column(args.text_column, "text")


def main(argv: list[str] | None = None) -> Path:
    """`mot-fillers`: returns the bank file it wrote."""
    args = parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    config = model.config
    if not getattr(config, "uses_groups", False):
        raise ValueError(
            f"{args.checkpoint!r} mixes no rows (config.uses_groups is false: a dense or Token Choice model): it needs "
            "no filler bank."
        )
    n_rows = config.group_size - 1 if args.rows is None else args.rows
    length = config.n_positions if args.length is None else args.length
    if n_rows < config.group_size - 1 or length < 2:
        raise ValueError(
            f"`--rows` must be >= group_size - 1 = {config.group_size - 1} and `--length` >= 2, got {n_rows} and "
            f"{length}."
        )
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    bank = spread_filler_bank(pack(load_source_text(args), tokenizer, length), n_rows, tokenizer.eos_token_id)
    model.set_group_fillers(bank)  # checks the ids against the model's vocabulary and EOS
    path = save_filler_bank(bank, args.checkpoint, config.group_size)
    print(f"wrote {path}: {n_rows} rows of {length} tokens")
    return path


if __name__ == "__main__":
    main()
