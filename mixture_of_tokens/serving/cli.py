"""`mot-serve CHECKPOINT` (also `python -m mixture_of_tokens.serving`): load the checkpoint into an [`Engine`] and
serve it under uvicorn."""

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..modeling_mot import load_filler_bank
from .api import create_app
from .engine import GROUPINGS, Engine

logger = logging.getLogger("mot-serve")  # the engine's logger: one name for all of the server's own lines

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mot-serve",
        description="OpenAI-compatible server for MoTGPT checkpoints that forms the MoT groups itself "
        "(docs/serving.md).",
    )
    parser.add_argument("checkpoint", help="model folder or Hub name (with its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--grouping",
        choices=GROUPINGS,
        default="isolated",
        help="isolated: each request in a group of its own, completed with fillers (answers independent of other "
        "requests); shared: requests admitted together share groups (more throughput, answers depend on them)",
    )
    parser.add_argument("--fillers", help="filler bank JSON file (default: the checkpoint's group_fillers.json)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="most requests decoded at once")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="how long a request waits for others")
    parser.add_argument("--max_queue", type=int, default=256, help="most waiting requests; more get HTTP 503")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="auto: as saved (float32 on CPU)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode steps with torch.compile (dynamic shapes): faster decoding after a compile per new "
        "shape class, so the first requests wait longer (docs/compile.md)",
    )
    parser.add_argument("--served_model_name", help="the name clients pass as `model` (default: the folder name)")
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    for name in ("max_batch_size", "max_queue"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_wait_ms < 0:
        parser.error("--max_wait_ms must be >= 0")
    return args


def load_engine(args: argparse.Namespace) -> Engine:
    """Model, tokenizer and filler bank of the command line's checkpoint, in an [`Engine`]."""
    dtype = DTYPES[args.dtype]
    if dtype == "auto" and args.device == "cpu":
        dtype = torch.float32  # half precision is slow on CPU and not what the checkpoint was evaluated in
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    fillers = getattr(model, "group_fillers", None)
    if args.fillers is not None:
        fillers = load_filler_bank(args.fillers, model.config.group_size)
    if getattr(model.config, "uses_groups", False) and fillers is None:
        raise ValueError(
            f"{args.checkpoint} mixes groups of {model.config.group_size} rows and needs a filler bank to complete "
            f"them in either grouping mode: add one to the checkpoint (`mot-fillers {args.checkpoint} --text "
            "FILE`) or give --fillers FILE."
        )
    return Engine(
        model, tokenizer, fillers, args.grouping, args.max_batch_size, args.max_wait_ms, args.max_queue, args.compile
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        engine = load_engine(args)
    except (OSError, ValueError) as error:
        raise SystemExit(f"mot-serve: error: {error}") from error
    name = args.served_model_name or Path(args.checkpoint.rstrip("/")).name
    logger.info(
        "serving %r: grouping %s, groups of %d rows, at most %d tokens per request",
        name, engine.grouping, engine.group_size, engine.context_limit,
    )  # fmt: skip
    # Uvicorn drains the requests in flight, then re-raises SIGTERM to the handler it found: make that a normal exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level)
