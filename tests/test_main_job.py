"""The main job end to end on a smoke budget: both runs, every evaluation, samples and the report."""

import json
import os
import subprocess

import pytest
from helpers import console_script

pytestmark = pytest.mark.slow  # end to end


def test_main_job_writes_the_report_with_perplexity_lm_eval_and_samples(tmp_path):
    command = [
        console_script("mot-main"), "--max_steps", "2", "--eval_steps", "2", "--batch_size", "16",
        "--block_size", "64", "--eval_blocks", "16", "--lm_eval_limit", "4",
        "--runs_dir", str(tmp_path / "runs"), "--report_dir", str(tmp_path / "report"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    for preset in ("mot-tiny-tuned", "dense-tiny-tuned"):
        assert set(metrics[preset]["lm_eval"]) == {"sotu_cloze", "sotu_perplexity"}
        assert 0 <= metrics[preset]["lm_eval"]["sotu_cloze"]["acc,none"] <= 1
    assert set(metrics["mot-tiny-tuned"]["validation"]) == {"batch", "single", "fillers"}
    assert (tmp_path / "runs" / "mot-tiny-tuned" / "group_fillers.json").exists()
    assert not (tmp_path / "runs" / "dense-tiny-tuned" / "group_fillers.json").exists()
    # Each run trained at its preset's tuned rate, and the report says where MoT stands against dense.
    for preset in ("mot-tiny-tuned", "dense-tiny-tuned"):
        arguments = json.loads((tmp_path / "runs" / preset / "run_arguments.json").read_text())
        assert arguments["--learning_rate"] == 4e-3
    gap = metrics["mot-tiny-tuned"]["validation"]["batch"]["mean_nll"]
    gap -= metrics["dense-tiny-tuned"]["validation"]["batch"]["mean_nll"]
    assert metrics["mot_minus_dense_validation_loss"] == pytest.approx(gap)
    side = "behind" if gap > 0 else "ahead of"
    assert f"{abs(gap):.3f} nats" in metrics["where_mot_stands"] and side in metrics["where_mot_stands"]
    assert metrics["where_mot_stands"] in (tmp_path / "report" / "model_card.md").read_text()
    samples = json.loads((report / "samples.json").read_text())
    assert all(len(items) == 8 and all(item["text"].startswith(item["prompt"]) for item in items)
               for items in samples.values())  # fmt: skip
    assert (report / "model_card.md").exists() and (report / "loss_curves.png").exists()
