"""OpenAI-compatible HTTP server for MoTGPT that forms the MoT groups itself: `mot-serve CHECKPOINT`.

A MoT model's output for one row depends on the other rows of its group (`config.group_size` consecutive batch rows),
so the way a server batches requests is part of every answer. This one queues the requests and decodes them together
in batches made of whole groups, in one of two modes (`--grouping`):

- `isolated` (default): each prompt gets a group of its own, completed with `group_size - 1` filler rows (the
  model's filler bank, `model.group_fillers`) that are fed their own text. Its answer depends only on its prompt, its
  parameters and its seed, never on other requests or on the load: greedy, it is the completion of
  `model.generate(prompt)`, which completes a lone prompt's group with the same bank.
- `shared`: the prompts admitted together fill groups among themselves; fillers complete only the last group. Up to
  `group_size` times fewer rows per request, but an answer depends on the requests that shared its group.

Models that need no groups (`config.uses_groups` False: dense, Token Choice, transition-tuned) are batched plainly.

A request is parsed and validated in `protocol.py`, checked against the served model in `api.py`, queued and grouped
in `engine.py`, answered in `api.py` with `protocol.py`'s response models; `cli.py` is the command. The model lives in
one worker thread, the [`Engine`]; the HTTP handlers hand it [`Job`]s (one per prompt) and read its [`Event`]s back.
Requests join the running batch as new groups (their prompts are run as a batch of their own, then their cache is
appended), and a group leaves the batch when its last request is done.

The engine needs neither FastAPI nor pydantic (the `serve` extra): this package exports it alone; the app is
`mixture_of_tokens.serving.api.create_app` and the command `mixture_of_tokens.serving.cli.main`.
"""

from .engine import (
    GROUPINGS,
    Batch,
    Engine,
    Event,
    Job,
    QueueFull,
    Row,
    SamplingParams,
    TextStream,
    TokenInfo,
    choose_token,
    merge_batches,
)

__all__ = [
    "GROUPINGS",
    "Batch",
    "Engine",
    "Event",
    "Job",
    "QueueFull",
    "Row",
    "SamplingParams",
    "TextStream",
    "TokenInfo",
    "choose_token",
    "merge_batches",
]
