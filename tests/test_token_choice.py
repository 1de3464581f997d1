"""Token Choice: router and experts behind transformers' experts interface (eager, batched_mm, grouped_mm), k expert
rows per token, and the capacity limit as gates."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_config
from transformers.integrations import moe

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.card import flops_per_token
from mixture_of_tokens.modeling_mot import TokenChoiceLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import token_choice_drops  # noqa: E402

B, S, D, E = 7, 5, 32, 8


def dropless_layer(dtype=torch.float64, experts_implementation="grouped_mm", **overrides) -> TokenChoiceLayer:
    config = tiny_config(ffn_type="token_choice", n_experts=E, capacity_factor=None, router_bias=True, **overrides)
    model = MoTGPTForCausalLM(config).to(dtype).eval()
    model.set_experts_implementation(experts_implementation)
    layer = model.transformer.h[0].mlp
    with torch.no_grad():
        for parameter in (layer.router.bias, layer.experts.up_proj_bias, layer.experts.down_proj_bias):
            if parameter is not None:
                parameter.normal_(0.0, 0.5)
    return layer


def reference(layer: TokenChoiceLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A plain loop over tokens and their top-k experts (softmax over experts of x @ router weight + router bias)."""
    out = torch.zeros_like(x)
    experts = layer.experts
    for row in range(x.shape[0]):
        for position in range(x.shape[1]):
            if not mask[row, position]:
                continue
            token = x[row, position]
            probs = torch.softmax(token @ layer.router.weight + layer.router.bias, dim=-1)
            gates, chosen = probs.topk(layer.num_experts_per_tok)
            gates = gates / gates.sum() if layer.norm_topk_prob else gates
            for gate, e in zip(gates, chosen.tolist(), strict=True):
                up_bias = 0 if experts.up_proj_bias is None else experts.up_proj_bias[e]
                down_bias = 0 if experts.down_proj_bias is None else experts.down_proj_bias[e]
                hidden = experts.act_fn(token @ experts.up_proj[e] + up_bias)
                out[row, position] += gate * (hidden @ experts.down_proj[e] + down_bias)
    return out


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize(
    ("dtype", "k", "expert_bias", "width", "tolerance"),
    [(torch.float64, 1, False, 16, 1e-10), (torch.float64, 2, True, 16, 1e-10), (torch.float64, 8, True, 16, 1e-10),
     (torch.float32, 2, True, 16, 1e-5), (torch.float32, 3, False, 16, 1e-5), (torch.float32, 2, True, 6, 1e-5)],
    ids=["f64-k1", "f64-k2-bias", "f64-all-experts", "f32-k2-bias", "f32-k3", "f32-odd-width"],
)  # fmt: skip
def test_dropless_layer_equals_a_plain_loop(implementation, dtype, k, expert_bias, width, tolerance):
    # torch's grouped_mm kernel takes neither float64 nor rows of 6 floats (24 bytes): the layer loops over experts.
    layer = dropless_layer(dtype, implementation, num_experts_per_tok=k, expert_bias=expert_bias, expert_size=width)
    assert layer.experts.has_bias == expert_bias
    x = torch.randn(B, S, D, dtype=dtype)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3).long()
    torch.testing.assert_close(layer(x, token_mask=mask), reference(layer, x, mask), rtol=tolerance, atol=tolerance)


def test_padding_states_change_no_router_logit_of_a_real_token_and_reach_no_output():
    model = MoTGPTForCausalLM(tiny_config(ffn_type="token_choice", capacity_factor=None)).eval()
    ids, mask = random_ids(3, 6), torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    inputs = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
        other = model(ids.masked_fill(mask == 0, 7), attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], other.logits[real], rtol=1e-5, atol=1e-6)
    # The router logits of every token (padding included) are those of its own hidden state, as before the roles.
    expected = inputs[0].reshape(3 * 6, -1) @ model.transformer.h[0].mlp.router.weight
    torch.testing.assert_close(out.router_logits[0], expected)


@pytest.fixture
def expert_rows(monkeypatch) -> list[torch.Tensor]:
    """Records the rows per expert of every grouped matmul that transformers' `grouped_mm` experts run."""
    calls = []
    grouped_mm = moe._grouped_mm

    def counting(rows, weight, offs):
        calls.append(torch.diff(offs, prepend=offs.new_zeros(1)))
        return grouped_mm(rows, weight, offs)

    monkeypatch.setattr(moe, "_grouped_mm", counting)
    return calls


@pytest.mark.parametrize("router", ["balanced", "skewed"])
def test_expert_matmuls_process_k_rows_per_token_however_skewed_the_router(router, expert_rows):
    layer = dropless_layer(torch.float32, num_experts_per_tok=2)
    if router == "skewed":
        with torch.no_grad():
            layer.router.bias.copy_(torch.tensor([20.0, 10.0] + [0.0] * (E - 2)))  # every token: experts 0 and 1
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 3:] = 0  # padding is computed too (its gates are 0), so that shapes never depend on the data
    layer(torch.randn(B, S, D), token_mask=mask)
    assert len(expert_rows) == 2  # up_proj and down_proj
    for tokens_per_expert in expert_rows:
        # Sorted dispatch is exact: k rows per token, not the busiest expert's load times the experts.
        assert int(tokens_per_expert.sum()) == 2 * B * S
    if router == "skewed":
        assert expert_rows[0].tolist() == [B * S, B * S] + [0] * (E - 2)


def test_cached_decoding_multiplies_k_rows_per_row_and_step(expert_rows):
    config = tiny_config(ffn_type="token_choice", n_experts=E, num_experts_per_tok=2, capacity_factor=None)
    model = MoTGPTForCausalLM(config).eval()
    prompt = random_ids(3, 4)
    model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    rows = [int(tokens_per_expert.sum()) for tokens_per_expert in expert_rows]
    n_matmuls = 2 * config.n_layer  # up_proj and down_proj of each block
    assert rows == [2 * 3 * 4] * n_matmuls + [2 * 3] * (4 * n_matmuls)  # the prompt, then 4 decode steps


def test_a_capacity_limit_drops_by_gates_and_costs_the_same_expert_rows():
    dense = MoTGPTForCausalLM(tiny_config(mot_layers=[]))
    shared = dict(ffn_type="token_choice", n_experts=E, num_experts_per_tok=2)
    dropless = MoTGPTForCausalLM(tiny_config(capacity_factor=None, **shared))
    limited = MoTGPTForCausalLM(tiny_config(capacity_factor=1.5, **shared))
    d, d_ff = dropless.config.n_embd, dropless.config.d_ff
    router_minus_dense_biases = 2 * (d * E - d_ff - d)
    assert flops_per_token(dropless) - flops_per_token(dense) == 2 * router_minus_dense_biases
    # The experts compute every assignment; the limit only zeroes the gates of those an expert cannot keep.
    assert flops_per_token(limited) == flops_per_token(dropless)


def test_router_bias_is_refused_outside_token_choice_and_must_be_a_boolean():
    with pytest.raises(ValueError, match=r"`router_bias=True` is only for ffn_type='token_choice'"):
        tiny_config(router_bias=True)
    with pytest.raises(ValueError, match=r"`router_bias` must be one of \(True, False\), got 1"):
        tiny_config(ffn_type="token_choice", router_bias=1)


def test_a_checkpoint_without_router_bias_loads_and_a_fresh_bias_starts_at_zero(tmp_path):
    config = tiny_config(ffn_type="token_choice", capacity_factor=None)
    MoTGPTForCausalLM(config).save_pretrained(tmp_path)
    assert MoTGPTForCausalLM.from_pretrained(tmp_path).transformer.h[0].mlp.router.bias is None
    biased = MoTGPTForCausalLM.from_pretrained(tmp_path, router_bias=True)
    assert all(torch.equal(block.mlp.router.bias, torch.zeros(4)) for block in biased.transformer.h)


def test_the_drop_measurement_finds_the_tokens_a_capacity_limited_layer_leaves_without_update():
    model = MoTGPTForCausalLM(tiny_config(ffn_type="token_choice", capacity_factor=0.5)).eval()
    updates = []
    model.transformer.h[1].mlp.register_forward_hook(lambda module, args, output: updates.append(output))
    dropped, chosen = zip(*token_choice_drops.dropped_assignments(model, random_ids(6, 8)), strict=True)
    assert [tuple(layer.shape) for layer in dropped + chosen] == [(6, 8, 1)] * 4
    # A capacity of ceil(0.5 * 48 / 4) = 6 holds all 6 tokens of the first position, whatever their experts.
    assert not dropped[1][:, 0].any() and dropped[1].float().mean() >= 0.5
    torch.testing.assert_close(dropped[1][..., 0], updates[0].abs().sum(-1) == 0, rtol=0, atol=0)
