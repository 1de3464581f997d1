"""Transition tuning (MoT -> Token Choice), temperature annealing, and the transition benchmark's quick mode."""

import contextlib
import copy
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import lay_out_hub_cache, random_ids, run_without_package, speech_corpus, tiny_config
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerControl,
    TrainerState,
)

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM, transition
from mixture_of_tokens.annealing import TemperatureAnnealingCallback, annealed_temperature, check_annealing
from mixture_of_tokens.conversion import BALANCING_TEMPERATURES, balancing_bias, mot_to_token_choice
from mixture_of_tokens.data import head, load_text, pack, train_bpe_tokenizer
from mixture_of_tokens.modeling_mot import MoTLayer, TokenChoiceLayer
from mixture_of_tokens.training import ScriptArguments, parse_args, run_training
from mixture_of_tokens.transition import (
    TRANSITION_DEFAULTS,
    TransitionArguments,
    main,
    run_transition_tuning,
    sample_calibration_blocks,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # where the benchmark scripts find `common`
# E 6, G 3, d_ff 128: FLOP-matched MoT experts are 3 * 128 / 6 = 64 wide, so k = 128 / 64 = 2 = E / G.
CONVERTIBLE = dict(n_experts=6, group_size=3)


def mot_model(**overrides) -> MoTGPTForCausalLM:
    return MoTGPTForCausalLM(tiny_config(**(CONVERTIBLE | overrides))).eval()


def perturb_(model: MoTGPTForCausalLM) -> MoTGPTForCausalLM:
    """Give biases and learned temperatures values away from their init, so that the test sees them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("_bias", "log_temperature")):
                parameter.normal_(0.0, 0.3)
    return model


def test_conversion_with_all_experts_equals_a_hand_computation_from_the_mot_weights():
    mot = perturb_(mot_model(expert_bias=True, learnable_temperature="expert").double())
    converted = mot_to_token_choice(mot, num_experts_per_tok=6, capacity_factor=None)
    converted.set_experts_implementation("eager")  # torch's grouped_mm kernel takes no float64
    source, layer = mot.transformer.h[0].mlp, converted.transformer.h[0].mlp
    assert isinstance(source, MoTLayer) and isinstance(layer, TokenChoiceLayer)
    x = torch.randn(4, 5, 32, dtype=torch.float64)

    probs = torch.softmax(x @ source.router.weight / source.log_temperature.exp(), dim=-1)  # (4, 5, E)
    expected = torch.zeros_like(x)
    experts = source.experts
    for e in range(6):
        hidden = torch.relu(x @ experts.up_proj[e] + experts.up_proj_bias[e])
        # Output scale E / G = 6 / 3, not k = 6: the gates sum to 1, a MoT token's weights to E / G on average.
        expected += probs[..., e, None] * (6 / 3) * (hidden @ experts.down_proj[e] + experts.down_proj_bias[e])
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_conversion_copies_every_other_weight_and_drops_the_temperature():
    mot = perturb_(mot_model(learnable_temperature="layer", mot_layers=[1]))
    converted = mot_to_token_choice(mot)
    before, after = mot.state_dict(), converted.state_dict()
    down_proj = "transformer.h.1.mlp.experts.down_proj"
    changed = {"transformer.h.1.mlp.router.weight", down_proj}
    assert set(before) - set(after) == {"transformer.h.1.mlp.log_temperature"}
    for name in set(after) - changed:
        assert torch.equal(after[name], before[name]), name
    torch.testing.assert_close(after[down_proj], 2 * before[down_proj])


def test_all_experts_give_a_group_of_identical_rows_exactly_its_uniform_mot_output():
    # Every uniform-MoT weight is 1 / G, so each of the 3 identical rows receives sum_e y_e / G; a Token Choice token
    # using all E experts with equal gates 1 / E, its outputs times E / G, receives the same.
    mot = perturb_(mot_model(ffn_type="uniform_mot", expert_bias=True).double())
    converted = mot_to_token_choice(mot, num_experts_per_tok=6, capacity_factor=None)
    converted.set_experts_implementation("eager")  # torch's grouped_mm kernel takes no float64
    source, layer = mot.transformer.h[0].mlp, converted.transformer.h[0].mlp
    with torch.no_grad():
        layer.router.weight.zero_()  # its fresh random router made uniform, as the source's logits are
    x = torch.randn(1, 5, 32, dtype=torch.float64).expand(3, 5, 32)
    torch.testing.assert_close(layer(x), source(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("expert_size", "k", "expected_k"), [(None, None, 2), (32, None, 4), (None, 1, 1), (None, 5, 5)]
)
def test_output_projections_are_multiplied_by_experts_over_group_size_whatever_k(expert_size, k, expected_k):
    mot = perturb_(mot_model(expert_size=expert_size, expert_bias=True))
    converted = mot_to_token_choice(mot, num_experts_per_tok=k)
    assert converted.config.num_experts_per_tok == expected_k
    for name in ("down_proj", "down_proj_bias"):
        expected = 2 * getattr(mot.transformer.h[0].mlp.experts, name)  # E / G = 6 / 3
        torch.testing.assert_close(getattr(converted.transformer.h[0].mlp.experts, name), expected, msg=name)


def test_default_experts_per_token_is_flop_matched_without_capacity_limit():
    config = mot_to_token_choice(mot_model()).config
    assert (config.ffn_type, config.num_experts_per_tok, config.expert_size) == ("token_choice", 2, 64)
    assert config.capacity_factor is None and config.norm_topk_prob is True
    assert config.learnable_temperature == "none" and config.router_bias is False  # no calibration text given
    assert config.output_router_logits is False


def test_a_uniform_mot_layer_gets_a_fresh_router_that_spreads_tokens_over_the_experts():
    torch.manual_seed(0)
    converted = mot_to_token_choice(mot_model(ffn_type="uniform_mot"))
    router, std = converted.transformer.h[0].mlp.router.weight, math.sqrt(0.1 / 32)  # the init of mot_init_scale 0.1
    assert 0.7 * std < router.std() < std and router.abs().max() <= 2 * std + 1e-7
    best = (torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) @ router).argmax(-1)
    assert set(best.tolist()) == set(range(6))  # a zero router sent every token to experts 0 and 1


def test_a_converted_router_with_one_expert_per_token_learns_through_the_balancing_loss():
    torch.manual_seed(0)
    converted = mot_to_token_choice(mot_model(), num_experts_per_tok=1).train()
    ids = random_ids(6, 8)

    def router_change(**kwargs) -> float:
        model = copy.deepcopy(converted)
        before = model.transformer.h[0].mlp.router.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            model(ids, labels=ids, **kwargs).loss.backward()
            optimizer.step()
        return float((model.transformer.h[0].mlp.router.weight.detach() - before).abs().max())

    # Transition tuning trains with the balancing loss; without it the gate is the constant 1 and the router gets no
    # gradient (up to rounding).
    assert router_change(output_router_logits=True) > 1e-5
    assert router_change() < 1e-7


def test_norm_topk_prob_true_gives_a_single_expert_gate_one():
    layer = (
        MoTGPTForCausalLM(tiny_config(ffn_type="token_choice", capacity_factor=None, norm_topk_prob=True))
        .transformer.h[0]
        .mlp
    )
    x = torch.randn(3, 4, 32)
    best = (x @ layer.router.weight).argmax(-1).flatten()
    experts = layer.experts
    expected = [
        torch.relu(token @ experts.up_proj[e]) @ experts.down_proj[e]
        for token, e in zip(x.view(-1, 32), best, strict=True)
    ]
    torch.testing.assert_close(layer(x), torch.stack(expected).view_as(x), rtol=1e-5, atol=1e-6)


def test_converted_model_gives_a_row_the_same_logits_alone_and_in_any_batch():
    mot = mot_model()
    converted = mot_to_token_choice(mot, calibration_ids=random_ids(12, 6, seed=3))
    ids = random_ids(8, 6)
    with torch.no_grad():
        # MoT itself mixes rows: the check below would fail for it.
        assert not torch.allclose(mot(ids[:1]).logits, mot(ids[:3]).logits[:1], atol=1e-4)
        alone = converted(ids[:1]).logits
        for batch in (ids[:3], ids[:5], torch.cat([random_ids(4, 6, seed=7), ids[:1]]), ids):
            row = (batch == ids[0]).all(dim=1).nonzero()[0, 0]
            torch.testing.assert_close(converted(batch).logits[row], alone[0], rtol=1e-5, atol=1e-5)


def test_converted_model_keeps_cached_generation_equal_for_a_row_alone_and_in_a_batch():
    # float64: greedy tokens of a batch and of a lone row agree only up to rounding (other matmul shapes).
    converted = mot_to_token_choice(mot_model(), calibration_ids=random_ids(12, 6, seed=3)).double()
    ids = random_ids(5, 4)
    together = converted.generate(ids, max_new_tokens=6, do_sample=False)
    alone = converted.generate(ids[3:4], max_new_tokens=6, do_sample=False)
    assert torch.equal(together[3], alone[0])
    # Cached decoding gives the logits of a full forward pass over the generated sequence.
    with torch.no_grad():
        steps = converted.generate(
            ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = converted(steps.sequences).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(steps.logits, dim=1), full.float(), rtol=1e-4, atol=1e-5)


LOADER = r"""
import json
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("mot-org/tiny-tc", trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[1]))).logits
print(json.dumps({
    "ffn_type": model.config.ffn_type,
    "layer": type(model.transformer.h[0].mlp).__name__,
    "imported": sorted(m for m in sys.modules if m.startswith("mixture_of_tokens")),
    "logits": logits.tolist(),
}))
"""


def test_a_saved_converted_model_computes_no_auxiliary_loss_unless_asked(tmp_path):
    mot_to_token_choice(mot_model(), calibration_ids=random_ids(12, 6, seed=3)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["output_router_logits"] is False
    reloaded, ids = AutoModelForCausalLM.from_pretrained(tmp_path).eval(), random_ids(4, 6)
    with torch.no_grad():
        plain, asked = reloaded(ids, labels=ids), reloaded(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and not plain.router_logits
    assert asked.aux_loss > 0
    torch.testing.assert_close(asked.loss, plain.loss + 0.01 * asked.aux_loss)


@pytest.mark.slow
def test_converted_checkpoint_loads_identically_with_and_without_the_package(tmp_path):
    converted = mot_to_token_choice(perturb_(mot_model(expert_bias=True, learnable_temperature="expert")))
    converted.save_pretrained(tmp_path / "saved")
    ids = random_ids(4, 6)
    with torch.no_grad():
        expected = converted(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)

    lay_out_hub_cache(tmp_path / "saved", tmp_path / "hub", "mot-org/tiny-tc")
    loaded = json.loads(run_without_package(LOADER, tmp_path / "hub", json.dumps(ids.tolist())).splitlines()[-1])
    assert (loaded["ffn_type"], loaded["layer"], loaded["imported"]) == ("token_choice", "TokenChoiceLayer", [])
    # Another process may run with another thread count (other matmul blocking): equal up to float32 rounding.
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5)


def tiny_learned_temperature() -> MoTGPTForCausalLM:
    model = mot_model(learnable_temperature="expert")
    with torch.no_grad():
        model.transformer.h[1].mlp.log_temperature[3] = math.log(1e-7)  # one expert of the second layer
    return model


@pytest.mark.parametrize(
    ("make_model", "kwargs", "message"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), {}, "must be a MoTGPTForCausalLM"),
        (lambda: mot_model(mot_layers=[]), {}, r"no MoT layer to convert \(`mot_layers`=\[\]\)"),
        (lambda: mot_model(ffn_type="token_choice"), {}, "`model.config.ffn_type` must be one of"),
        (lambda: MoTGPTForCausalLM(tiny_config()), {}, r"d_ff / expert_size = 128 / 96, which is not a whole"),
        (mot_model, {"num_experts_per_tok": 7}, r"`num_experts_per_tok` must be an integer in \[1, n_experts=6\]"),
        (mot_model, {"num_experts_per_tok": 0}, r"`num_experts_per_tok` must be an integer in \[1, n_experts\]"),
        (
            mot_model,
            {"capacity_factor": -1.0},
            r"`capacity_factor` must be None \(no limit\) or a number > 0, got -1.0",
        ),
        (lambda: mot_model(router_temperature=0.0), {}, "`router_temperature` is 0"),
        (
            lambda: mot_model(router_temperature=1e-31),
            {},
            r"`router_temperature` of the MoT layer in block 0 must be >= 1e-06 to convert, got 1e-31",
        ),
        (
            tiny_learned_temperature,
            {},
            r"learned temperature exp\(`log_temperature`\) of the MoT layer in block 1 must be >= 1e-06 .* got 1e-07",
        ),
    ],
    ids=["not-motgpt", "dense", "token-choice", "k-not-whole", "k-above-E", "k-zero", "capacity", "T-0", "T-tiny"]
    + ["learned-T-tiny"],
)
def test_conversion_refuses_bad_input(make_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mot_to_token_choice(make_model(), **kwargs)


def test_the_smallest_accepted_temperature_converts_to_finite_logits():
    converted = mot_to_token_choice(mot_model(router_temperature=1e-6))
    with torch.no_grad():
        assert torch.isfinite(converted(random_ids(4, 6)).logits).all()


def test_config_refuses_a_non_boolean_norm_topk_prob():
    with pytest.raises(ValueError, match=r"`norm_topk_prob` must be one of \(None, True, False\), got 'yes'"):
        MoTGPTConfig(norm_topk_prob="yes")


# Balanced conversion


def first_choice_loads(model: MoTGPTForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """For each Token Choice layer, each expert's share of the first choices of the tokens of `ids`, times the
    number of experts (1 everywhere when balanced)."""
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    return [torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]) / logits.shape[0] * logits.shape[-1]
            for logits in router_logits]  # fmt: skip


def add_shared_offset_(mot: MoTGPTForCausalLM, offset: torch.Tensor) -> None:
    """Add `offset` `(n_experts,)` to the controller logits of every token, which MoT's softmax over the group ignores.

    The controller sees x = gamma * n + beta after LayerNorm, where n sums to 0 over the features, so x . (1 / gamma)
    is beta . (1 / gamma) for every token (not 0 once beta is): a controller column along 1 / gamma adds a constant."""
    with torch.no_grad():
        for block in mot.transformer.h:
            direction = 1 / block.ln_2.weight
            block.mlp.router.weight += torch.outer(direction / (block.ln_2.bias @ direction), offset)


def test_calibration_removes_a_per_expert_offset_that_mot_ignores():
    mot, ids = mot_model(), random_ids(8, 6)
    calibration = random_ids(32, 6, seed=3)
    with torch.no_grad():
        for block in mot.transformer.h:
            block.ln_2.bias.normal_(0.0, 0.5)
        before = mot(ids).logits
        plain = mot_to_token_choice(mot, calibration_ids=calibration)
        add_shared_offset_(mot, torch.tensor([6.0, 3.0, 0.0, 0.0, -3.0, -6.0]))
        torch.testing.assert_close(mot(ids).logits, before, rtol=1e-4, atol=1e-4)  # MoT does not see it
    assert all(load[0] == 6 for load in first_choice_loads(mot_to_token_choice(mot), ids))  # expert 0 takes all
    calibrated = mot_to_token_choice(mot, calibration_ids=calibration)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(ids).logits, plain(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("far", "temperatures"), [(0.0, BALANCING_TEMPERATURES), (60.0, (0.03,))], ids=["skewed", "underflowing"]
)
def test_balancing_bias_gives_every_expert_an_equal_share_of_first_choices(far, temperatures):
    logits = torch.randn(4096, 16) + torch.linspace(-4, 4, 16)  # skewed: expert 15 first for most tokens
    logits[:, 0] -= far  # straight at t = 0.03, its softmax share underflows to 0
    assert torch.bincount(logits.argmax(-1), minlength=16).max() > 0.5 * 4096
    loads = torch.bincount((logits + balancing_bias(logits, temperatures)).argmax(-1), minlength=16)
    assert loads.min() >= 0.9 * 256 and loads.max() <= 1.1 * 256


# Temperature annealing


def test_annealed_temperature_holds_then_follows_a_cosine_to_zero():
    values = [annealed_temperature(step, 100, 2.0, 0.5) for step in (0, 50, 75, 100)]
    assert values == [2.0, 2.0, pytest.approx(1.0), 0.0]
    assert annealed_temperature(60, 100, 2.0, 0.5) > annealed_temperature(61, 100, 2.0, 0.5)
    assert annealed_temperature(1, 100, 1.0, 1.0) < 1.0


def test_annealing_callback_sets_each_layer_from_the_global_step_alone():
    model = mot_model(router_temperature=1.5)
    callback = TemperatureAnnealingCallback(start_temperature=1.5, fraction=0.5)
    # A resumed run enters with the global step of its checkpoint: the schedule continues from there.
    callback.on_step_begin(None, TrainerState(global_step=30, max_steps=40), TrainerControl(), model=model)
    expected = annealed_temperature(30, 40, 1.5, 0.5)
    assert 0 < expected < 1.5
    assert [block.mlp.temperature for block in model.transformer.h] == [expected, expected]
    assert model.config.router_temperature == expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    return speech_corpus(tmp_path_factory.mktemp("corpus"), 3)


def data_args(corpus) -> list[str]:
    return [
        "--corpus", corpus["train"], "--validation", corpus["valid"], "--data_cache_dir", corpus["cache"],
        "--block_size", "16", "--max_eval_blocks", "6", "--disable_tqdm", "true", "--seed", "3",
    ]  # fmt: skip


def annealing_run(corpus, output_dir: Path, *extra: str) -> list[str]:
    return (
        data_args(corpus)
        + ["--vocab_size", "300", "--output_dir", str(output_dir), "--max_steps", "4", "--save_steps", "2"]
        + ["--eval_steps", "100", "--per_device_train_batch_size", "6", "--per_device_eval_batch_size", "6"]
        + ["--model", "n_layer=1", "n_embd=32", "n_head=2", "n_experts=6", "group_size=3"]
        + ["--anneal_temperature", "true", "--anneal_fraction", "1.0", *extra]
    )


@pytest.fixture(scope="module")
def annealed_run(corpus, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("annealed")
    run_training(*parse_args(annealing_run(corpus, output_dir)))
    return output_dir


def test_annealed_run_ends_at_temperature_zero_and_saves_it(annealed_run):
    checkpoint = json.loads((annealed_run / "checkpoint-2" / "config.json").read_text())
    assert checkpoint["router_temperature"] == pytest.approx(annealed_temperature(2, 4, 1.0, 1.0)) == 0.5
    assert json.loads((annealed_run / "config.json").read_text())["router_temperature"] == 0
    assert AutoModelForCausalLM.from_pretrained(annealed_run).transformer.h[0].mlp.temperature == 0


@pytest.fixture(scope="module")
def trained_mot(corpus, tmp_path_factory) -> Path:
    """A tiny MoT model (E 8, G 4, so k = 2) trained for 30 steps on the corpus."""
    output_dir = tmp_path_factory.mktemp("trained-mot")
    argv = data_args(corpus) + ["--vocab_size", "300", "--output_dir", str(output_dir), "--max_steps", "30"]
    argv += ["--learning_rate", "3e-3", "--eval_steps", "100", "--save_steps", "100", "--logging_steps", "100"]
    argv += ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8"]
    run_training(*parse_args(argv + ["--model", "n_layer=2", "n_embd=32", "n_head=2", "n_experts=8", "group_size=4"]))
    return output_dir


def test_a_trained_model_converts_to_a_balanced_router_on_held_out_text(corpus, trained_mot):
    mot, tokenizer = AutoModelForCausalLM.from_pretrained(trained_mot), AutoTokenizer.from_pretrained(trained_mot)
    script = ScriptArguments(corpus=[corpus["train"]], block_size=16, data_cache_dir=corpus["cache"])
    calibration = sample_calibration_blocks(script, TransitionArguments(calibration_blocks=64), tokenizer, seed=0)
    held_out = torch.tensor(head(pack(load_text([corpus["valid"]]), tokenizer, 16), 64)["input_ids"])  # 1,024 tokens
    # Without the router bias a few experts take most first choices and some none.
    raw = first_choice_loads(mot_to_token_choice(mot), held_out)
    assert max(float(load.max()) for load in raw) > 4 and any(bool((load == 0).any()) for load in raw)
    for load in first_choice_loads(mot_to_token_choice(mot, calibration_ids=calibration), held_out):
        assert load.max() <= 2 and load.min() > 0  # the busiest at most twice the uniform share; no expert idle


def test_calibration_blocks_come_from_the_calibration_corpus_when_given(corpus, trained_mot):
    tokenizer = AutoTokenizer.from_pretrained(trained_mot)
    script = ScriptArguments(corpus=[corpus["train"]], block_size=16, data_cache_dir=corpus["cache"])
    held_out = {tuple(ids) for ids in pack(load_text([corpus["valid"]]), tokenizer, 16)["input_ids"]}
    own = TransitionArguments(calibration_blocks=8, calibration_corpus=[corpus["valid"]])
    assert {tuple(ids) for ids in sample_calibration_blocks(script, own, tokenizer, seed=0).tolist()} <= held_out
    default = sample_calibration_blocks(script, TransitionArguments(calibration_blocks=8), tokenizer, seed=0)
    assert not {tuple(ids) for ids in default.tolist()} & held_out  # the training corpus


def test_resumed_annealed_run_continues_the_schedule(corpus, annealed_run, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((annealed_run / name).read_bytes())
    shutil.copytree(annealed_run / "checkpoint-2", tmp_path / "checkpoint-2")
    run_training(*parse_args(annealing_run(corpus, tmp_path, "--resume", "true")))
    expected, actual = load_file(annealed_run / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "config.json").read_text())["router_temperature"] == 0


@pytest.mark.parametrize(
    ("config", "fraction", "message"),
    [
        (tiny_config(learnable_temperature="layer"), 0.5, "needs learnable_temperature='none', got 'layer'"),
        (tiny_config(ffn_type="token_choice"), 0.5, "got ffn_type='token_choice', mot_layers='all'"),
        (tiny_config(mot_layers=[]), 0.5, r"got ffn_type='mot', mot_layers=\[\]"),
        (GPT2Config(), 0.5, "got ffn_type=None, mot_layers=None"),
        (tiny_config(), 0.0, r"`anneal_fraction` must be in \(0, 1\], got 0.0"),
    ],
    ids=["learnable", "token-choice", "dense", "gpt2", "fraction"],
)
def test_annealing_refuses_models_it_cannot_anneal(config, fraction, message):
    with pytest.raises(ValueError, match=message):
        check_annealing(config, fraction)


# The script and the benchmark


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mot_checkpoint(corpus, tmp_path_factory) -> Path:
    """A saved MoT model (E 6, G 3, so k = 2) with a BPE tokenizer trained on the corpus."""
    folder = tmp_path_factory.mktemp("mot")
    tokenizer = train_bpe_tokenizer([Path(corpus["train"]).read_text()], vocab_size=300)
    mot_model(vocab_size=len(tokenizer), n_positions=16, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_transition_script_converts_and_tunes_a_checkpoint_into_a_token_choice_model(corpus, mot_checkpoint, tmp_path):
    # A batch of 4 is not a multiple of group_size 3: refused for MoT, fine for the converted model.
    main(
        data_args(corpus)
        + ["--model_name_or_path", str(mot_checkpoint), "--output_dir", str(tmp_path / "tuned")]
        + ["--max_steps", "3", "--eval_steps", "3", "--save_steps", "3", "--learning_rate", "1e-3"]
        + ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--num_experts_per_tok", "3"]
    )
    mot = AutoModelForCausalLM.from_pretrained(mot_checkpoint)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    switched = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned" / "converted")
    assert (tuned.config.ffn_type, tuned.config.num_experts_per_tok, tuned.config.expert_size) == (
        "token_choice",
        3,
        64,
    )
    assert isinstance(tuned.transformer.h[1].mlp, TokenChoiceLayer)
    assert not torch.equal(tuned.transformer.h[0].mlp.experts.up_proj, switched.transformer.h[0].mlp.experts.up_proj)
    assert torch.equal(switched.transformer.h[0].mlp.experts.up_proj, mot.transformer.h[0].mlp.experts.up_proj)
    assert (tmp_path / "tuned" / "modeling_mot.py").exists() and (tmp_path / "tuned" / "tokenizer.json").exists()
    assert any("eval_loss" in json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").open())
    # Calibrated, trained with the balancing loss (as the checkpoint's config shows), calibrated again after tuning
    # (the final router bias is not the last checkpoint's), saved without the loss.
    assert switched.transformer.h[0].mlp.router.bias.abs().sum() > 0
    last = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned" / "checkpoint-3")
    assert last.config.output_router_logits is True
    assert not torch.equal(last.transformer.h[0].mlp.router.bias, switched.transformer.h[0].mlp.router.bias)
    assert not torch.equal(tuned.transformer.h[0].mlp.router.bias, last.transformer.h[0].mlp.router.bias)
    torch.testing.assert_close(
        tuned.transformer.h[0].mlp.experts.up_proj, last.transformer.h[0].mlp.experts.up_proj, rtol=0, atol=0
    )
    for model in (tuned, switched):
        assert model.config.router_bias is True and model.config.output_router_logits is False


def test_transition_script_help_lists_the_training_arguments_and_its_own_defaults(capsys):
    main(["--help"])
    shown = capsys.readouterr().out
    for argument in ("--num_experts_per_tok", "--capacity_factor", "--corpus", "--resume", "--learning_rate"):
        assert argument in shown, argument
    assert " ".join(TRANSITION_DEFAULTS) in shown


class OneProcessArguments:
    """What `run_transition_tuning` reads of `MoTTrainingArguments`, as one process of a distributed run sees it.
    `main_process_first` records whether the conversion was on disk when the process left it (when the replicas
    waiting there would go on and load it)."""

    def __init__(self, output_dir: Path, should_save: bool):
        self.output_dir, self.should_save, self.save_on_each_node, self.seed = str(output_dir), should_save, False, 0
        self.first_local, self.saved_when_released = None, None

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work"):
        self.first_local = local
        yield
        self.saved_when_released = (Path(self.output_dir) / "converted" / "config.json").exists()


@pytest.fixture
def trained_from(monkeypatch) -> list[tuple[str, list[str]]]:
    """`run_training` replaced by a stub that records the checkpoint and the config overrides it was given and, where
    that checkpoint exists, saves it as training leaves it: in the output folder, with the balancing loss on."""
    calls = []

    def run_training(script, args):
        calls.append((script.model_name_or_path, script.model))
        if Path(script.model_name_or_path).exists():
            AutoModelForCausalLM.from_pretrained(script.model_name_or_path, output_router_logits=True).save_pretrained(
                args.output_dir
            )
            AutoTokenizer.from_pretrained(script.model_name_or_path).save_pretrained(args.output_dir)

    monkeypatch.setattr(transition, "run_training", run_training)
    return calls


def transition_script(corpus, mot_checkpoint, **kwargs) -> ScriptArguments:
    return ScriptArguments(
        model_name_or_path=str(mot_checkpoint), corpus=[corpus["train"]], data_cache_dir=corpus["cache"],
        block_size=16, **kwargs,
    )  # fmt: skip


def test_only_the_saving_process_converts_and_it_does_so_before_releasing_the_others(
    corpus, mot_checkpoint, tmp_path, trained_from
):
    script = transition_script(corpus, mot_checkpoint, model=["n_head=2"])
    replica = OneProcessArguments(tmp_path, should_save=False)
    run_transition_tuning(script, replica, TransitionArguments())
    assert not (tmp_path / "converted").exists()
    main = OneProcessArguments(tmp_path, should_save=True)
    run_transition_tuning(script, main, TransitionArguments())
    assert main.saved_when_released and main.first_local is False  # one shared copy: the global main process first
    # Both train with the balancing loss on (the user's overrides after it, so they win); only the saving process
    # writes the tuned config, with it off.
    assert trained_from == [(str(tmp_path / "converted"), ["output_router_logits=true", "n_head=2"])] * 2
    assert json.loads((tmp_path / "config.json").read_text())["output_router_logits"] is False


@pytest.mark.slow
def test_resuming_refuses_transition_arguments_other_than_the_saved_conversions(
    corpus, mot_checkpoint, tmp_path, trained_from
):
    args = OneProcessArguments(tmp_path, should_save=True)
    run_transition_tuning(transition_script(corpus, mot_checkpoint), args, TransitionArguments(3))
    resume = transition_script(corpus, mot_checkpoint, resume=True)
    for agreeing in (TransitionArguments(), TransitionArguments(num_experts_per_tok=3)):
        run_transition_tuning(resume, args, agreeing)
    message = r"`--num_experts_per_tok`=2 differs from the saved conversion's num_experts_per_tok=3"
    with pytest.raises(ValueError, match=message):
        run_transition_tuning(resume, args, TransitionArguments(num_experts_per_tok=2))
    with pytest.raises(ValueError, match=r"`--capacity_factor`=1.5 differs from .* capacity_factor=None"):
        run_transition_tuning(resume, args, TransitionArguments(capacity_factor=1.5))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], r"`--mot_run`=.* needs --skip_annealing"),
        (["--skip_annealing"], r"has no metrics.jsonl with logged steps .* pass --mot_steps N"),
        (["--skip_annealing", "--mot_steps", "0"], r"`--mot_steps`=0 must be an integer >= 1"),
    ],
    ids=["annealing", "no-step-count", "mot-steps-0"],
)
def test_transition_benchmark_refuses_a_mot_run_before_training(tmp_path, argv, message):
    benchmark = load_script("benchmarks/transition_vs_annealing.py")
    with pytest.raises(ValueError, match=message):
        benchmark.main(["--mot_run", str(tmp_path), "--runs_dir", str(tmp_path / "runs"), *argv])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_transition_benchmark_quick_mode_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runs' block cache goes to ./.cache
    benchmark = load_script("benchmarks/transition_vs_annealing.py")
    benchmark.main(["--quick", "--runs_dir", str(tmp_path), "--out", str(tmp_path / "transition.json")])
    results = json.loads((tmp_path / "transition.json").read_text())
    assert (tmp_path / "transition.png").exists()
    loss, curve = results["validation_loss"], results["tuning_curve"]
    assert set(loss) == {"mot", "mot_t0", "uncalibrated_switch", "after_switch", "tuned", "annealed_t0"}
    for key, value in [*loss.items(), *(("tuning curve", value) for _, value in curve)]:
        assert math.isfinite(value) and value > 0, key
    # The benchmark evaluates every tuning checkpoint itself (one per step here), then the final, recalibrated model.
    assert [step for step, _ in curve] == list(range(results["tuning_steps"] + 1))
    assert curve[0][1] == loss["after_switch"] and curve[-1][1] < loss["after_switch"]
    assert [step for step, _ in results["balance_curve"]] == [step for step, _ in curve]
    balances = [results["balance_uncalibrated"], results["balance_tuned"], *(b for _, b in results["balance_curve"])]
    assert all(len(layers) == len(results["mot_layers"]) == 1 for layers in balances)
    assert results["expert_rows_per_assignment"] == {"training": 1.0, "decoding": 1.0}
    speed = results["speed"]
    assert set(speed["train_step_ms"]) == {"dense", "mot", "token_choice"}
    assert set(speed["generation_tokens_per_second"]["batch_1"]) == {"dense", "token_choice"}  # MoT needs a group
    assert results["annealed_curve"][-1][0] == results["mot_steps"]
