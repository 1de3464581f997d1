"""Token Choice without a capacity limit: sorted dispatch through grouped matmuls, k expert rows per real token."""

import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_config

from mixture_of_tokens import MoTGPTForCausalLM, modeling_mot
from mixture_of_tokens.card import flops_per_token
from mixture_of_tokens.modeling_mot import TokenChoiceLayer, grouped_mm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import token_choice_drops  # noqa: E402

B, S, D, E = 7, 5, 32, 8


def dropless_layer(dtype=torch.float64, **overrides) -> TokenChoiceLayer:
    config = tiny_config(ffn_type="token_choice", n_experts=E, capacity_factor=None, router_bias=True, **overrides)
    layer = MoTGPTForCausalLM(config).transformer.h[0].mlp.to(dtype).eval()
    with torch.no_grad():
        for parameter in (layer.router_bias, layer.b_in, layer.b_out):
            if parameter is not None:
                parameter.normal_(0.0, 0.5)
    return layer


def reference(layer: TokenChoiceLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A plain loop over tokens and their top-k experts (softmax over experts of x @ controller + router bias)."""
    out = torch.zeros_like(x)
    for row in range(x.shape[0]):
        for position in range(x.shape[1]):
            if not mask[row, position]:
                continue
            token = x[row, position]
            probs = torch.softmax(token @ layer.controller + layer.router_bias, dim=-1)
            gates, chosen = probs.topk(layer.num_experts_per_tok)
            gates = gates / gates.sum() if layer.norm_topk_prob else gates
            for gate, e in zip(gates, chosen.tolist(), strict=True):
                hidden = layer.act(token @ layer.w_in[e] + (0 if layer.b_in is None else layer.b_in[e]))
                out[row, position] += gate * (hidden @ layer.w_out[e] + (0 if layer.b_out is None else layer.b_out[e]))
    return out


@pytest.mark.parametrize(
    ("dtype", "k", "expert_bias", "tolerance"),
    [(torch.float64, 1, False, 1e-10), (torch.float64, 2, True, 1e-10), (torch.float64, 8, True, 1e-10),
     (torch.float32, 2, True, 1e-5), (torch.float32, 3, False, 1e-5)],
    ids=["f64-k1", "f64-k2-bias", "f64-all-experts", "f32-k2-bias", "f32-k3"],
)  # fmt: skip
def test_dropless_layer_equals_a_plain_loop(dtype, k, expert_bias, tolerance):
    # float32 runs torch's grouped matmul kernel, float64 the per-expert loop beside it.
    layer = dropless_layer(dtype, num_experts_per_tok=k, expert_bias=expert_bias, expert_size=16)
    x = torch.randn(B, S, D, dtype=dtype)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3).long()
    update, router_logits = layer(x, attention_mask=mask)
    torch.testing.assert_close(update, reference(layer, x, mask), rtol=tolerance, atol=tolerance)
    expected_logits = x.reshape(-1, D) @ layer.controller + layer.router_bias
    torch.testing.assert_close(router_logits, expected_logits, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("dtype", "width"), [(torch.float32, 8), (torch.float32, 6), (torch.float64, 8)], ids=["kernel", "odd", "f64"]
)
def test_grouped_mm_multiplies_each_expert_s_rows_by_its_matrix_forward_and_backward(dtype, width):
    weight = torch.randn(5, width, 12, dtype=dtype, requires_grad=True)
    counts = torch.tensor([0, 4, 0, 1, 3])  # empty experts first, inside and last
    rows = torch.randn(8, width, dtype=dtype, requires_grad=True)
    expert = torch.repeat_interleave(torch.arange(5), counts)
    expected = torch.stack([row @ weight[e] for row, e in zip(rows, expert.tolist(), strict=True)])
    out = grouped_mm(rows, weight, counts)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, (rows, weight), grad), torch.autograd.grad(expected, (rows, weight), grad)
    )


@pytest.fixture
def expert_rows(monkeypatch) -> list[torch.Tensor]:
    """Records the rows per expert of every grouped matmul the layers run."""
    calls = []

    def counting(rows, weight, tokens_per_expert):
        calls.append(tokens_per_expert.clone())
        return grouped_mm(rows, weight, tokens_per_expert)

    monkeypatch.setattr(modeling_mot, "grouped_mm", counting)
    return calls


@pytest.mark.parametrize("router", ["balanced", "skewed"])
def test_expert_matmuls_process_k_rows_per_real_token_however_skewed_the_router(router, expert_rows):
    layer = dropless_layer(torch.float32, num_experts_per_tok=2)
    if router == "skewed":
        with torch.no_grad():
            layer.router_bias.copy_(torch.tensor([20.0, 10.0] + [0.0] * (E - 2)))  # every token: experts 0 and 1
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 3:] = 0
    n_real = int(mask.sum())
    layer(torch.randn(B, S, D), attention_mask=mask)
    assert len(expert_rows) == 2  # w_in and w_out
    for tokens_per_expert in expert_rows:
        # The bound of the issue is 1.15 times the nominal k rows per token: sorted dispatch is exact.
        assert int(tokens_per_expert.sum()) == 2 * n_real <= 1.15 * 2 * n_real
    if router == "skewed":
        assert expert_rows[0].tolist() == [n_real, n_real] + [0] * (E - 2)


def test_cached_decoding_multiplies_k_rows_per_row_and_step(expert_rows):
    config = tiny_config(ffn_type="token_choice", n_experts=E, num_experts_per_tok=2, capacity_factor=None)
    model = MoTGPTForCausalLM(config).eval()
    prompt = random_ids(3, 4)
    model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    rows = [int(tokens_per_expert.sum()) for tokens_per_expert in expert_rows]
    n_matmuls = 2 * config.n_layer  # w_in and w_out of each block
    assert rows == [2 * 3 * 4] * n_matmuls + [2 * 3] * (4 * n_matmuls)  # the prompt, then 4 decode steps


def test_grouped_mm_takes_no_longer_when_every_row_goes_to_one_expert():
    # The rows, not the busiest expert's load times the experts, set the work: a padded buffer would be 32x here.
    weight, rows = torch.randn(32, 128, 256), torch.randn(2048, 128)
    balanced, skewed = torch.full((32,), 64), torch.tensor([2048] + [0] * 31)

    def best_of(tokens_per_expert: torch.Tensor) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            grouped_mm(rows, weight, tokens_per_expert)
            times.append(time.perf_counter() - start)
        return min(times)

    best_of(balanced)  # warm-up
    assert best_of(skewed) < 2 * best_of(balanced)


def test_model_card_counts_k_expert_rows_without_a_limit_and_the_whole_buffer_with_one():
    dense = MoTGPTForCausalLM(tiny_config(mot_layers=[]))
    shared = dict(ffn_type="token_choice", n_experts=E, num_experts_per_tok=2)
    dropless = MoTGPTForCausalLM(tiny_config(capacity_factor=None, **shared))
    limited = MoTGPTForCausalLM(tiny_config(capacity_factor=1.5, **shared))
    d, d_ff = dropless.config.n_embd, dropless.config.d_ff
    router_minus_dense_biases = 2 * (d * E - d_ff - d)
    assert flops_per_token(dropless) - flops_per_token(dense) == 2 * router_minus_dense_biases
    # Every expert multiplies its buffer of 1.5 * tokens * k / E rows: half the dense MLP's FLOPs more, per layer.
    extra = 0.5 * 2 * 2 * d * d_ff
    assert flops_per_token(limited) - flops_per_token(dense) == pytest.approx(2 * (router_minus_dense_biases + extra))


def test_router_bias_is_refused_outside_token_choice_and_must_be_a_boolean():
    with pytest.raises(ValueError, match=r"`router_bias=True` is only for ffn_type='token_choice'"):
        tiny_config(router_bias=True)
    with pytest.raises(ValueError, match=r"`router_bias` must be True or False, got 1"):
        tiny_config(ffn_type="token_choice", router_bias=1)


def test_a_checkpoint_without_router_bias_loads_and_a_fresh_bias_starts_at_zero(tmp_path):
    config = tiny_config(ffn_type="token_choice", capacity_factor=None)
    MoTGPTForCausalLM(config).save_pretrained(tmp_path)
    assert MoTGPTForCausalLM.from_pretrained(tmp_path).transformer.h[0].mlp.router_bias is None
    biased = MoTGPTForCausalLM.from_pretrained(tmp_path, router_bias=True)
    assert all(torch.equal(block.mlp.router_bias, torch.zeros(4)) for block in biased.transformer.h)


def test_the_drop_measurement_finds_the_tokens_a_capacity_limited_layer_leaves_without_update():
    model = MoTGPTForCausalLM(tiny_config(ffn_type="token_choice", capacity_factor=0.5)).eval()
    updates = []
    model.transformer.h[1].mlp.register_forward_hook(lambda module, args, output: updates.append(output[0]))
    dropped, chosen = zip(*token_choice_drops.dropped_assignments(model, random_ids(6, 8)), strict=True)
    assert [tuple(layer.shape) for layer in dropped + chosen] == [(6, 8, 1)] * 4
    # A capacity of ceil(0.5 * 48 / 4) = 6 holds all 6 tokens of the first position, whatever their experts.
    assert not dropped[1][:, 0].any() and dropped[1].float().mean() >= 0.5
    torch.testing.assert_close(dropped[1][..., 0], updates[0].abs().sum(-1) == 0, rtol=0, atol=0)
