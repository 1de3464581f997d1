"""Publish a trained checkpoint: write exactly the folder a Hub repo gets, and optionally upload it.

    mot-evaluate runs/mot-tiny                                # the card needs evaluation results
    mot-publish runs/mot-tiny --dry-run out/mot-tiny          # write the folder, upload nothing
    mot-publish runs/mot-tiny --repo-id ORG/NAME              # the same folder, uploaded

The folder holds safetensors weights, config.json with `auto_map`, configuration_mot.py and modeling_mot.py (so it
loads with trust_remote_code=True where this package is not installed), the tokenizer, generation_config.json with a
pad token, the filler bank `group_fillers.json` when the run saved one, and README.md rendered from the package's
`templates/motgpt.md` with the results of `mot-evaluate`.
"""

import argparse
import json
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM, AutoTokenizer

from .card import render_model_card
from .modeling_mot import FILLER_FILE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mot-publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a trained run or checkpoint folder (with its tokenizer)")
    parser.add_argument("--dry-run", dest="dry_run", help="write the folder here and upload nothing")
    parser.add_argument("--repo-id", dest="repo_id", help="ORG/NAME on the Hub")
    parser.add_argument("--eval-results", dest="eval_results", help="default: CHECKPOINT/eval_results.json")
    parser.add_argument("--dense-twin", dest="dense_twin", help="the dense twin's folder, for the FLOPs comparison")
    parser.add_argument("--training-details", dest="training_details", default="See the project's README.")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.repo_id:
        parser.error("give --dry-run DIR, --repo-id ORG/NAME, or both")
    return args


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse a folder whose weights are not safetensors."""
    if not checkpoint.is_dir():
        raise ValueError(f"checkpoint {str(checkpoint)!r} is not a folder.")
    weights = [p.name for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    if not any(name.endswith(".safetensors") for name in weights):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} has no safetensors weights (found: {weights or 'no weights'}); "
            "re-save it with `save_pretrained` (safetensors is the default) before publishing."
        )


def write_release(checkpoint: Path, folder: Path, args: argparse.Namespace) -> Path:
    """Write the folder that would be uploaded; return it."""
    check_checkpoint(checkpoint)
    eval_path = Path(args.eval_results) if args.eval_results else checkpoint / "eval_results.json"
    if not eval_path.is_file():
        raise ValueError(
            f"no evaluation results at {str(eval_path)!r}: run `mot-evaluate {checkpoint}` first "
            "(a published card must report them)."
        )
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dense_twin = AutoModelForCausalLM.from_pretrained(args.dense_twin) if args.dense_twin else None
    repo_id = args.repo_id or f"your-org/{checkpoint.resolve().name}"
    card = render_model_card(
        model, json.loads(eval_path.read_text()), repo_id, args.training_details, dense_twin=dense_twin
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if (checkpoint / FILLER_FILE).is_file():
        (folder / FILLER_FILE).write_bytes((checkpoint / FILLER_FILE).read_bytes())
    card.save(folder / "README.md")
    return folder


def main(argv: list[str] | None = None) -> None:
    """`mot-publish`."""
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if args.dry_run:
        folder = write_release(checkpoint, Path(args.dry_run), args)
        print(f"wrote {folder}: {sorted(p.name for p in folder.iterdir())}")
    if args.repo_id:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.dry_run) if args.dry_run else write_release(checkpoint, Path(tmp), args)
            api = HfApi()
            api.create_repo(args.repo_id, private=args.private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=args.repo_id, commit_message="Upload MoTGPT")
        print(f"uploaded to https://huggingface.co/{args.repo_id}")
