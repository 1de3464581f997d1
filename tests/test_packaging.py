"""What a plain (non-editable) `pip install` gives: the wheel holds every file the package reads at run time, and the
console entry points work from an installation where the checkout is not importable."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import tiny_config

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.data import load_sotu, train_bpe_tokenizer

pytestmark = pytest.mark.slow  # builds and installs a wheel

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = (
    "mot-train", "mot-finetune", "mot-evaluate", "mot-publish", "mot-transition-tune", "mot-lm-eval", "mot-serve",
    "mot-fillers", "mot-main",
)  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("mixture_of_tokens-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (dependencies come from this environment)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def run_installed(installed: Path, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `command` where `installed` comes first on the path, from a folder outside the checkout."""
    env = os.environ | {"PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_holds_the_run_time_files_and_the_entry_points(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("mixture_of_tokens/templates/motgpt.md", "mixture_of_tokens/metrics/perplexity/perplexity.py"):
        assert needed in names, needed
    tasks = [name for name in names if name.startswith("mixture_of_tokens/tasks/")]
    assert any(name.endswith(".yaml") for name in tasks) and any(name.endswith(".jsonl") for name in tasks)
    (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{name} = " in declared for name in ENTRY_POINTS)


# Runs in one interpreter where only the installed wheel is on the path: loads each console script the wheel declares,
# as its `bin/` wrapper does, calls it with `--help`, and reports what it printed and where the package came from.
HELP_OF_EVERY_ENTRY_POINT = """
import contextlib, importlib.metadata, io, json, sys
(dist,) = importlib.metadata.distributions(path=[sys.argv[1]])
answers = {}
for entry_point in dist.entry_points.select(group="console_scripts"):
    sys.argv, out, code = [entry_point.name, "--help"], io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            entry_point.load()()
        except SystemExit as stop:
            code = stop.code
    answers[entry_point.name] = {"exit_code": code, "output": out.getvalue()}
import mixture_of_tokens
print(json.dumps({"package": mixture_of_tokens.__file__, "answers": answers}))
"""


def test_every_entry_point_of_the_installed_wheel_answers_help_from_the_installation(installed, tmp_path):
    # One interpreter for all of them: each one spends its time importing torch and transformers.
    result = run_installed(installed, [sys.executable, "-c", HELP_OF_EVERY_ENTRY_POINT, str(installed)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(installed)
    assert sorted(report["answers"]) == sorted(ENTRY_POINTS)
    for name, answer in report["answers"].items():
        assert answer["exit_code"] in (0, None) and "usage" in answer["output"].lower(), f"{name}: {answer}"
    assert all((installed / "bin" / name).exists() for name in ENTRY_POINTS)


def test_installed_wheel_evaluates_and_renders_a_card_outside_the_checkout(installed, tmp_path):
    tokenizer = train_bpe_tokenizer(load_sotu()["train"]["text"][:5], vocab_size=300)
    model = MoTGPTForCausalLM(tiny_config(vocab_size=300, n_positions=32, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    evaluate = [str(installed / "bin" / "mot-evaluate"), str(tmp_path / "model"), "--max_blocks", "3"]
    result = run_installed(installed, [*evaluate, "--data_cache_dir", str(tmp_path / "cache")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "model" / "eval_results.json").read_text())["validation"]["batch"]["tokens"] == 93
    publish = [str(installed / "bin" / "mot-publish"), str(tmp_path / "model"), "--dry-run", str(tmp_path / "release")]
    result = run_installed(installed, publish, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trust_remote_code=True" in (tmp_path / "release" / "README.md").read_text()
