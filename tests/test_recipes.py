"""The authors' recipes, the fair sparse baselines, the quality benchmark's repeat guard and the capacity benchmark."""

import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from test_baseline_layers import B, D, S, make_layer, padding_mask, reference_expert_choice

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import capacity  # noqa: E402
import common  # noqa: E402
import quality  # noqa: E402

from mixture_of_tokens import MoTGPTForCausalLM  # noqa: E402
from mixture_of_tokens.presets import RECIPES, preset_config  # noqa: E402
from mixture_of_tokens.training import parse_args  # noqa: E402

POC, MEDIUM, COMMON = (
    "configs/baselines/gpt/mot/mini.yaml",
    "configs/mot/medium_32E_16.yaml",
    "configs/baselines/common.yaml",
)
# What each source file sets (llm-random, branch `mot_configs`), as this model and `mot-train` name it.
SOURCES = {
    "poc": {"n_experts / group_size": (16, POC), "blocks": ([0, 1, 2, 3], POC), "router_temperature": (1.0, POC),
            "mot_init_scale": (1.0, POC), "learning_rate": (2e-3, POC), "weight_decay": (0.0, POC),
            "warmup_steps": (0.01, COMMON), "max_grad_norm": (0.5, COMMON)},
    "medium": {"n_experts / group_size": (16, MEDIUM), "blocks": ([2, 3], MEDIUM), "router_temperature": (1.0, MEDIUM),
               "mot_init_scale": (0.1, MEDIUM), "learning_rate": (7e-4, MEDIUM), "weight_decay": (0.1, MEDIUM),
               "warmup_steps": (0.0167, COMMON), "max_grad_norm": (0.5, COMMON)},
}  # fmt: skip


def variant(name: str) -> tuple:
    """A variant's config on the tiny backbone (4 blocks, G 16) and its training fields, read from the table."""
    spec = common.variant_config(name, "tiny")
    return common.preset_config(spec["preset"], vocab_size=64, n_positions=16, **spec["overrides"]), spec["training"]


@pytest.mark.parametrize("recipe", ["poc", "medium"])
def test_each_recipe_variant_builds_what_its_source_file_says(recipe):
    expected = SOURCES[recipe]
    mot, training = variant(f"mot_{recipe}")
    dense, dense_training = variant(f"dense_{recipe}")
    assert mot.n_experts // mot.group_size == expected["n_experts / group_size"][0]
    assert mot.mot_layer_indices == expected["blocks"][0] and dense.mot_layer_indices == []
    assert mot.router_temperature == expected["router_temperature"][0] and mot.ffn_type == "mot"
    for config in (mot, dense):  # the dense twin's MLP starts as the experts do, under the same recipe
        assert (config.mot_init_scale, config.mlp_init) == (expected["mot_init_scale"][0], "experts")
    for field in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm"):
        assert training[field] == dense_training[field] == pytest.approx(expected[field][0])
    assert training["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    # Beside each field, the file that sets it.
    for field, (_, source) in expected.items():
        key = {"n_experts / group_size": "k", "blocks": "mot_layers"}.get(field, field)
        assert source in RECIPES[recipe][key][1]
    # The T 0.1 variant differs from the recipe in the temperature only.
    changed, changed_training = variant(f"mot_{recipe}_t0.1")
    assert changed_training == training
    assert {k: v for k, v in changed.to_diff_dict().items() if mot.to_diff_dict().get(k) != v} == {
        "router_temperature": 0.1
    }


def test_recipe_presets_follow_the_authors_backbones_and_train_with_the_recipe():
    poc, medium = preset_config("mot-poc"), preset_config("mot-medium-32e16")
    assert (poc.n_layer, poc.n_embd, poc.n_head, poc.group_size, poc.n_experts) == (4, 256, 4, 32, 512)
    assert (poc.mot_init_scale, poc.mot_layer_indices) == (1.0, [0, 1, 2, 3])
    assert (medium.n_layer, medium.n_embd, medium.group_size, medium.n_experts) == (8, 512, 32, 512)
    assert (medium.mot_init_scale, medium.mot_layer_indices) == (0.1, [4, 5, 6, 7])
    assert preset_config("dense-poc").mot_layer_indices == [] and preset_config("dense-poc").mot_init_scale == 1.0
    _, args = parse_args(["--preset", "mot-poc"])
    assert (args.learning_rate, args.weight_decay, args.warmup_steps, args.max_grad_norm) == (2e-3, 0.0, 0.01, 0.5)
    _, args = parse_args(["--preset", "dense-medium-32e16", "--weight_decay", "0.3"])  # the command line wins
    assert (args.learning_rate, args.weight_decay) == (7e-4, 0.3)
    _, args = parse_args(["--preset", "mot-tiny"])  # no recipe: mot-train's defaults
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (7e-4, 0.1, 0.05)


def test_tuned_presets_are_the_committed_quality_benchmarks_pick_at_its_rates():
    """`mot-main`'s defaults train the final comparison's dense and MoT models, as the committed summary chose them."""
    summary = json.loads((ROOT / "benchmarks" / "results" / "quality.json").read_text())["summary"]
    for preset, role in (("mot-tiny-tuned", "mot"), ("dense-tiny-tuned", "dense")):
        chosen = summary["chosen"][role]
        expected, _ = variant(chosen)
        config = preset_config(preset, vocab_size=64, n_positions=16)
        assert config.to_diff_dict() == expected.to_diff_dict(), (preset, chosen)
        _, args = parse_args(["--preset", preset])
        assert args.learning_rate == summary["learning_rates"][chosen]


def test_mot_k16_is_no_longer_called_the_authors_setting():
    assert "mot_k16" not in quality.MOT_TUNED[:2] and {"mot_poc", "mot_medium"} <= set(quality.MOT_TUNED)
    source = (ROOT / "benchmarks" / "common.py").read_text()
    line = next(line for line in source.splitlines() if line.strip().startswith('"mot_k16":'))
    assert "authors" not in line and "proof-of-concept" not in line


def test_fair_sparse_baselines_spend_the_dense_expert_flops():
    dense, _ = variant("dense")
    for name, (experts, per_token, width) in {"token_choice_top1": (16, 1, 512), "token_choice_top2": (32, 2, 256),
                                              "expert_choice_norm": (16, 1, 512),
                                              "expert_choice_norm_top2": (32, 2, 256)}.items():  # fmt: skip
        config, _ = variant(name)
        assert (config.n_experts, config.num_experts_per_tok, config.expert_size_resolved) == (
            experts,
            per_token,
            width,
        )
        assert per_token * width == dense.d_ff  # expert FLOPs per token of the dense MLP
        if config.ffn_type == "token_choice":  # dropless, with Switch's balancing loss
            assert config.capacity_factor is None and config.output_router_logits
        else:  # each expert takes capacity * E tokens of a group of G: G * per_token picks per group
            assert config.expert_choice_output_norm and config.expert_choice_capacity * experts == 16 * per_token


def test_expert_choice_output_norm_is_a_layer_norm_of_the_update_and_off_by_default():
    assert not tiny_config(ffn_type="expert_choice", num_experts_per_tok=2).expert_choice_output_norm
    with pytest.raises(ValueError, match="expert_choice_output_norm"):
        tiny_config(expert_choice_output_norm=True)  # MoT has no such norm
    layer = make_layer(ffn_type="expert_choice", num_experts_per_tok=2, expert_choice_output_norm=True)
    with torch.no_grad():
        layer.output_norm.weight.uniform_(0.5, 1.5)
        layer.output_norm.bias.uniform_(-0.5, 0.5)
    x, mask = torch.randn(B, S, D, dtype=torch.float64), padding_mask()
    expected = layer.output_norm(reference_expert_choice(layer, x, mask)) * mask[..., None]
    torch.testing.assert_close(layer(x, token_mask=mask), expected, rtol=1e-9, atol=1e-10)
    # A checkpoint saved without the field loads with the layer as it was.
    model = MoTGPTForCausalLM(tiny_config(ffn_type="expert_choice", num_experts_per_tok=2))
    assert model.transformer.h[0].mlp.output_norm is None


def test_unprocessed_fraction_counts_the_real_tokens_no_expert_picks():
    layer = make_layer(ffn_type="expert_choice", group_size=8)  # 4 experts take 2 of a group's 7 real rows each
    x, mask = torch.randn(B, S, D, dtype=torch.float64), padding_mask()
    update = reference_expert_choice(layer, x, mask)
    missed = ((update == 0).all(dim=-1) & mask.bool()).sum() / mask.sum()  # a picked token gets a non-zero update
    assert 0 < layer.unprocessed_fraction(x, mask) == pytest.approx(float(missed))


def test_fair_expert_choice_leaves_fewer_tokens_without_an_update_than_the_old_layer():
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    fractions = {}
    for name in ("expert_choice", "expert_choice_norm", "expert_choice_norm_top2"):
        torch.manual_seed(0)
        spec = common.variant_config(name, "tiny")
        fractions[name] = common.expert_choice_unprocessed(common.variant_model(spec, 64, 16), ids)
        assert len(fractions[name]) == 4 and all(0 < f < 1 for f in fractions[name])
    # Each token picked twice on average by experts half as wide: far fewer tokens left out in every layer.
    assert max(fractions["expert_choice_norm_top2"]) < min(fractions["expert_choice"])
    assert max(fractions["expert_choice_norm_top2"]) < 0.2 < min(fractions["expert_choice"])


@pytest.fixture
def small_text(tmp_path) -> list[str]:
    """Arguments of a quick quality run (blocks of 16 tokens, batches of 16 blocks) on a short text."""
    words = "the nation is strong and the people are free; we will build roads, schools and ports for all".split()
    generator = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (400,), generator=generator).tolist())
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:1000])
    return ["--block_size", "16", "--batch_size", "16", "--eval_blocks", "16", "--tune_steps", "2",
            "--corpus", str(tmp_path / "train.txt"), "--validation", str(tmp_path / "valid.txt"),
            "--vocab_size", "300", "--data_cache_dir", str(tmp_path / "cache"), "--runs_dir", str(tmp_path / "runs"),
            "--curves_dir", str(tmp_path / "curves"), "--out", str(tmp_path / "q.json")]  # fmt: skip


def test_repeat_guard_refuses_a_run_past_one_epoch_unless_asked_and_marks_it(small_text, tmp_path, monkeypatch):
    args = quality.parse_args(small_text)
    blocks = quality.training_blocks(tuple(args.corpus), args.vocab_size, args.block_size, args.data_cache_dir)
    epoch = blocks // args.batch_size
    assert epoch >= 1
    within = quality.check_repeats("dense-lr0.001-s0-1", epoch, args)
    assert within["repeats_text"] is False and within["tokens_seen"] <= within["training_tokens"]
    with pytest.raises(ValueError, match=rf"dense-lr0.001-s0-{epoch + 1}.*--allow_repeats") as refused:
        quality.check_repeats(f"dense-lr0.001-s0-{epoch + 1}", epoch + 1, args)
    assert f"{(epoch + 1) * 16 * 16:,} tokens of a training text of {blocks * 16:,} tokens" in str(refused.value)
    # The tuning stage is refused before it trains; with the flag the runs train and are marked.
    monkeypatch.setattr(quality, "TUNED", ("dense", "expert_choice_norm_top2"))
    argv = small_text + ["--stage", "tune", "--learning_rates", "1e-3", "--tune_steps", str(epoch + 1)]
    argv += ["--grid_extensions", "0"]  # one rate each: no widening of the grid
    with pytest.raises(ValueError, match="--allow_repeats"):
        quality.main(argv)
    assert not (tmp_path / "runs").exists()
    summary = quality.main(argv + ["--allow_repeats"])["summary"]
    names = [f"{variant}-lr0.001-s0-{epoch + 1}" for variant in ("dense", "expert_choice_norm_top2")]
    records = [json.loads((tmp_path / "curves" / "tiny" / f"{name}.json").read_text()) for name in names]
    for record in records:
        assert record["repeats_text"] is True
        assert record["epochs"] == pytest.approx((epoch + 1) * 16 / blocks, abs=1e-3)
    assert summary["runs_repeating_text"] == names
    # An Expert Choice run reports the held-out tokens each of its layers leaves without an update.
    assert records[0]["expert_choice_unprocessed"] is None
    assert len(records[1]["expert_choice_unprocessed"]) == 4
    assert all(0 <= fraction < 1 for fraction in records[1]["expert_choice_unprocessed"])


def test_quality_applies_a_recipes_training_fields(small_text, monkeypatch):
    captured = {}

    def stop(script, training_args, run):
        captured[script.preset] = training_args
        raise InterruptedError

    monkeypatch.setattr(quality, "train_or_reuse", stop)
    args = quality.parse_args(small_text)
    for name in ("mot_poc", "mot_k16"):
        with pytest.raises(InterruptedError):
            quality.train(name, 1e-3, 0, 1, args)
        training = captured.popitem()[1]
        expected = (0.0, 0.01, 0.5) if name == "mot_poc" else (0.1, 0.05, 0.5)  # the recipe's, else the defaults
        assert (training.weight_decay, training.warmup_steps, training.max_grad_norm) == expected
        assert training.learning_rate == 1e-3  # the run's own rate; the recipe's joins the tuning grid
    assert quality.tuning_rates("mot_medium", args) == [7e-4, 1e-3, 2e-3, 4e-3]
    assert quality.tuning_rates("dense", args) == [1e-3, 2e-3, 4e-3]


def test_capacity_benchmark_runs_end_to_end_in_quick_mode_and_resumes(tmp_path, monkeypatch):
    argv = ["--quick", "--curves_dir", str(tmp_path / "runs"), "--out", str(tmp_path / "capacity.json")]
    results = capacity.main(argv)
    assert set(results["summary"]) == set(capacity.QUICK["variants"])
    assert results["settings"]["repeats_text"] is True and (tmp_path / "capacity.png").stat().st_size > 0
    for entry in results["summary"].values():
        assert set(entry["by_n"]) == {"32", "64"}
    record = json.loads((tmp_path / "runs" / "mot_poc-n64-s0.json").read_text())
    assert record["bits_stored"] == record["facts_recalled"] * 4 * math.log2(32)
    assert [step for step, _ in record["facts_recalled_curve"]] == [20, 40]  # 2 steps an epoch, 20 epochs
    assert results["summary"]["mot_poc"]["by_n"]["64"]["facts_recalled_curve"] == record["facts_recalled_curve"]
    # Finished runs are read back, not trained again; other settings are refused.
    monkeypatch.setattr(capacity, "train_run", lambda *args: pytest.fail("trained again"))
    assert capacity.main(argv)["summary"] == json.loads(json.dumps(results["summary"]))
    with pytest.raises(ValueError, match="other settings"):
        capacity.main(argv + ["--epochs", "3"])


def capacity_args(**changes) -> Namespace:
    return Namespace(**({"key_len": 3, "value_len": 3, "symbols": 16} | changes))


@pytest.mark.parametrize("ffn_type", ["mot", None])
def test_capacity_recall_equals_greedy_decoding_of_each_group(ffn_type):
    """Facts whose values are the model's own greedy continuation (decoded group by group, as recall scores them)
    are recalled; a fact with one value token changed is not."""
    args = capacity_args()
    config = tiny_config(group_size=4, n_experts=8, n_positions=16, mot_layers=[] if ffn_type is None else "all")
    model = MoTGPTForCausalLM(config).eval()
    facts = capacity.make_facts(8, args, seed=0)
    start = capacity.value_start(facts, args.value_len)
    for group in facts.split(4):  # greedy decoding of a whole group at once: its rows mix as in scoring
        prompts = group[:, :start]  # SEP is the tiny config's pad id: every token is real
        decoded = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, min_new_tokens=3, do_sample=False
        )
        group[:, start:] = decoded[:, start:]
    assert capacity.recalled(model, facts, args.value_len, batch_size=8).all()
    facts[[1, 6], -1] = (facts[[1, 6], -1] - capacity.SPECIALS + 1) % args.symbols + capacity.SPECIALS
    assert capacity.recalled(model, facts, args.value_len, batch_size=8).tolist() == [i not in (1, 6) for i in range(8)]
    if ffn_type is None:  # rows do not interact: each fact alone gives the same answer
        alone = [bool((model(row[None]).logits[0, start - 1 : -1].argmax(-1) == row[start:]).all()) for row in facts]
        assert alone == capacity.recalled(model, facts, args.value_len, batch_size=4).tolist()


def test_capacity_facts_have_distinct_keys_and_refuse_too_many():
    facts = capacity.make_facts(200, capacity_args(key_len=2, symbols=16), seed=1)
    assert facts.shape == (200, 2 + 2 + 3) and len(torch.unique(facts[:, 1:3], dim=0)) == 200
    assert (facts[:, 0] == capacity.BOS).all() and (facts[:, 3] == capacity.SEP).all()
    assert facts[:, [1, 2, 4, 5, 6]].min() >= capacity.SPECIALS
    with pytest.raises(ValueError, match="n_facts"):
        capacity.make_facts(300, capacity_args(key_len=2, symbols=16), seed=1)
