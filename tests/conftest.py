"""Fixtures of the test suite; the helpers the tests import live in `helpers.py`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import speech_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    return speech_corpus(tmp_path_factory.mktemp("corpus"), 4)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
