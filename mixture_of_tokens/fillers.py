"""Filler banks: reference rows of training text that complete a MoT group around requests that arrive alone.

A MoT model's output for one row depends on the other rows of its group. To score or decode a single request with
the group statistics the model was trained with, the paper places it in a group with `group_size - 1` training
sequences ("fillers") and reads only its own row. A checkpoint trained by `mot-train` carries such a bank in
`group_fillers.json`; `mot-lm-eval`, `mot-serve` and `generate(..., group_fillers=...)` read it.

The file holds `{"group_size": G, "input_ids": [[...], ...]}`: at least `G - 1` rows of equal length, none holding
the EOS id (a filler that emitted EOS while decoding would leave its group).
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers.utils import cached_file

FILLER_FILE = "group_fillers.json"


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


def save_filler_bank(fillers: torch.Tensor, folder: str | Path, group_size: int) -> Path:
    """Write `fillers` `(n_rows, length)` to `folder/group_fillers.json`; return the file."""
    check_filler_bank(fillers, group_size)
    path = Path(folder) / FILLER_FILE
    path.write_text(json.dumps({"group_size": group_size, "input_ids": fillers.tolist()}) + "\n")
    return path


def load_filler_bank(source: str | Path, group_size: int, min_length: int | None = None) -> torch.LongTensor:
    """The filler bank of a checkpoint folder (its `group_fillers.json`), of a Hub model name, or of a JSON file of
    that format, checked to hold at least `group_size - 1` rows of at least `min_length` tokens.

    Raises `ValueError` naming the source when there is no bank or it does not fit."""
    path = Path(source)
    if path.is_dir():
        path = path / FILLER_FILE
    elif not path.exists() and not str(source).endswith(".json"):
        resolved = cached_file(str(source), FILLER_FILE, _raise_exceptions_for_missing_entries=False)
        path = Path(resolved) if resolved else path / FILLER_FILE
    if not path.is_file():
        raise ValueError(
            f"no filler bank at {str(path)!r}: a MoT checkpoint trained with mot-train saves one as {FILLER_FILE}; "
            "otherwise pass a fillers file (JSON with an 'input_ids' list of token id rows)."
        )
    try:
        data = json.loads(path.read_text())
        fillers = torch.tensor(data["input_ids"], dtype=torch.long)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"filler bank {str(path)!r} must be JSON with an 'input_ids' list of equal-length token id rows: {error}"
        ) from error
    check_filler_bank(fillers, group_size, min_length, str(path))
    return fillers


def check_filler_bank(
    fillers: torch.Tensor, group_size: int, min_length: int | None = None, name: str = "fillers"
) -> None:
    """Refuse a bank that cannot complete a group of `group_size` rows of `min_length` tokens."""
    if fillers.ndim != 2 or fillers.shape[0] < group_size - 1 or (min_length and fillers.shape[1] < min_length):
        raise ValueError(
            f"{name} must hold at least group_size - 1 = {group_size - 1} rows of at least {min_length or 1} tokens, "
            f"got shape {tuple(fillers.shape)}."
        )
