"""Fixtures of the test suite; the helpers the tests import live in `helpers.py`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import speech_corpus  # noqa: E402

# Fixtures that start subprocesses (servers on localhost ports): every test using one is marked `slow`.
SUBPROCESS_FIXTURES = {"servers"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SUBPROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    return speech_corpus(tmp_path_factory.mktemp("corpus"), 4)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
