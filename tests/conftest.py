import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mixture_of_tokens import MoTGPTConfig  # noqa: E402

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


def random_ids(batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB_SIZE, (batch_size, seq_len), generator=generator)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
