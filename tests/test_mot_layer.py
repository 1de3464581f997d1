"""The MoT layer on its own: the invariants of docs/model.md ("What depends on the batch"), against a plain per-group
loop written from the paper's formulas."""

import pytest
import torch
from helpers import tiny_config

from mixture_of_tokens import MoTGPTForCausalLM, MoTLayer, mixing_weights

B, S, D = 7, 5, 32  # 7 rows with groups of 3: two full groups and a remainder group of one row


def make_layer(**overrides) -> MoTLayer:
    """A MoT layer with the model's initialization, in float64 so comparisons can be tight."""
    model = MoTGPTForCausalLM(tiny_config(**overrides))
    return model.transformer.h[0].mlp.double().eval()


def random_mask(batch_size: int = B, seq_len: int = S, seed: int = 1) -> torch.Tensor:
    mask = torch.rand(batch_size, seq_len, generator=torch.Generator().manual_seed(seed)) > 0.3
    return mask.long()


def reference_mot(
    layer: MoTLayer, x: torch.Tensor, mask: torch.Tensor, temperature: float, emit_over_experts: bool = False
) -> torch.Tensor:
    """The layer of Antoniak et al. written as plain loops over groups, positions and experts. With
    `emit_over_experts`, each token receives the outputs with the softmax of its own logits over the experts (the
    authors' variant)."""
    batch_size, seq_len, _ = x.shape
    out = torch.zeros_like(x)
    n_experts, experts = layer.router.weight.shape[1], layer.experts
    for start in range(0, batch_size, layer.group_size):
        rows = range(start, min(start + layer.group_size, batch_size))
        for s in range(seq_len):
            real = [i for i in rows if mask[i, s]]
            if not real:
                continue
            tokens = x[real, s]  # (g, d)
            logits = tokens @ layer.router.weight  # (g, E)
            if temperature == 0:
                weights = torch.nn.functional.one_hot(logits.argmax(0), len(real)).T.to(x.dtype)
            else:
                weights = torch.softmax(logits / temperature, dim=0)
            emit = torch.softmax(logits / temperature, dim=1) if emit_over_experts else weights
            for e in range(n_experts):
                mixed = weights[:, e] @ tokens
                hidden = mixed @ experts.up_proj[e]
                if experts.up_proj_bias is not None:
                    hidden = hidden + experts.up_proj_bias[e]
                y = experts.act_fn(hidden) @ experts.down_proj[e]
                if experts.down_proj_bias is not None:
                    y = y + experts.down_proj_bias[e]
                for j, i in enumerate(real):
                    out[i, s] += emit[j, e] * y
    return out


def run(layer: MoTLayer, x: torch.Tensor, mask=None, temperature=None) -> torch.Tensor:
    return layer(x, token_mask=mask, router_temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("overrides", [{}, {"expert_bias": True, "expert_activation": "gelu_new"}])
def test_layer_equals_plain_per_group_loop(temperature, overrides):
    layer = make_layer(**overrides)
    if layer.experts.up_proj_bias is not None:
        torch.nn.init.normal_(layer.experts.up_proj_bias)
        torch.nn.init.normal_(layer.experts.down_proj_bias)
    x = torch.randn(B, S, D, dtype=torch.float64)
    mask = random_mask()
    expected = reference_mot(layer, x, mask, temperature)
    torch.testing.assert_close(run(layer, x, mask, temperature), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_expert_softmax_emit_weights_equal_the_loop(temperature):
    layer = make_layer(mot_emit_weights="experts")
    x = torch.randn(B, S, D, dtype=torch.float64)
    mask = random_mask()
    expected = reference_mot(layer, x, mask, temperature, emit_over_experts=True)
    torch.testing.assert_close(run(layer, x, mask, temperature), expected, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(expected, reference_mot(layer, x, mask, temperature))  # the variant changes the output


def test_output_and_router_logits_shapes():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    assert layer(x).shape == (B, S, D)
    assert layer.router(x).shape == (B * S, 4)  # flattened, as Mixtral's router logits


def test_changing_a_later_position_leaves_earlier_positions_unchanged():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    changed = x.clone()
    changed[:, 3:] = torch.randn(B, S - 3, D, dtype=torch.float64)
    torch.testing.assert_close(run(layer, x)[:, :3], run(layer, changed)[:, :3], rtol=0, atol=0)


def test_rows_in_other_groups_do_not_affect_a_group():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    changed = x.clone()
    changed[3:] = torch.randn(B - 3, S, D, dtype=torch.float64)  # everything but group 0 (rows 0-2)
    torch.testing.assert_close(run(layer, x)[:3], run(layer, changed)[:3], rtol=0, atol=0)
    changed_row = x.clone()
    changed_row[1] += 1.0  # a row in group 0 does change the other rows of group 0
    assert not torch.allclose(run(layer, x)[0], run(layer, changed_row)[0])


def test_masked_token_content_does_not_change_unmasked_outputs():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    mask = random_mask()
    changed = torch.where(mask.bool()[..., None], x, 100 * torch.randn_like(x))
    out, out_changed = run(layer, x, mask), run(layer, changed, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], out_changed[real], rtol=0, atol=0)
    assert torch.all(out[~real] == 0), "masked tokens receive no MoT update"


def test_all_masked_group_gives_zero_update_and_finite_gradients():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[:3] = 0  # group 0 is all padding
    for temperature in (None, 0.0):
        out = run(layer, x, mask, temperature)
        assert torch.all(out[:3] == 0)
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        x.grad = None


def test_full_group_rows_are_unchanged_by_rows_that_follow():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    # Equal up to float rounding: the batched matmuls may block a different number of groups differently.
    torch.testing.assert_close(run(layer, x[:6]), run(layer, x)[:6], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(run(layer, x[:3]), run(layer, x)[:3], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batch_size", [1, 2, 4, B])
def test_any_batch_size_without_mask_matches_the_loop(batch_size):
    layer = make_layer()
    x = torch.randn(batch_size, S, D, dtype=torch.float64)
    expected = reference_mot(layer, x, torch.ones(batch_size, S, dtype=torch.long), 1.0)
    torch.testing.assert_close(run(layer, x), expected, rtol=1e-9, atol=1e-10)


def test_permuting_rows_inside_a_group_permutes_their_outputs():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    mask = random_mask()
    perm = torch.tensor([2, 0, 1, 3, 4, 5, 6])  # rotate group 0, keep the rest
    out = run(layer, x, mask)
    torch.testing.assert_close(run(layer, x[perm], mask[perm]), out[perm], rtol=1e-12, atol=1e-12)


def test_weights_sum_to_one_over_the_real_tokens_of_a_group():
    logits = torch.randn(3, 4, 5, 6)
    mask = torch.rand(3, 4, 5, 1) > 0.4
    mask[0, :, 0] = False
    weights = mixing_weights(logits, mask, 0.7)
    sums = weights.sum(dim=1)
    has_real = mask.any(dim=1).expand_as(sums)
    torch.testing.assert_close(sums[has_real], torch.ones_like(sums[has_real]))
    assert torch.all(sums[~has_real] == 0)
    assert torch.all(weights[~mask.expand_as(weights)] == 0)


def test_temperature_zero_is_one_hot_argmax_over_real_tokens():
    logits = torch.randn(2, 4, 3, 5)
    mask = torch.ones(2, 4, 3, 1, dtype=torch.bool)
    mask[0, 1] = False
    weights = mixing_weights(logits, mask, 0.0)
    winners = logits.masked_fill(~mask, float("-inf")).argmax(dim=1)
    expected = torch.nn.functional.one_hot(winners, 4).movedim(-1, 1).float()
    assert torch.equal(weights, expected)


@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 1e-30])
def test_weights_approach_discrete_routing_as_temperature_goes_to_zero(temperature):
    logits = torch.randn(2, 4, 3, 5)
    mask = torch.rand(2, 4, 3, 1) > 0.3
    discrete = mixing_weights(logits, mask, 0.0)
    soft = mixing_weights(logits, mask, temperature)
    assert torch.isfinite(soft).all()
    gap = (soft - discrete).abs().max().item()
    assert gap < (0.5 if temperature == 1e-2 else 1e-6)


def test_layer_output_converges_to_discrete_routing():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    discrete = run(layer, x, temperature=0.0)
    gaps = [(run(layer, x, temperature=t) - discrete).abs().max().item() for t in (1.0, 1e-2, 1e-5)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-8


def test_per_call_temperature_overrides_the_configured_one():
    x = torch.randn(B, S, D, dtype=torch.float64)
    layer = make_layer(router_temperature=1.0)
    other = make_layer(router_temperature=0.25)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(run(layer, x, temperature=0.25), run(other, x), rtol=0, atol=0)
    assert not torch.allclose(run(layer, x), run(other, x))


def test_negative_per_call_temperature_is_refused():
    with pytest.raises(ValueError, match="router_temperature"):
        run(make_layer(), torch.randn(B, S, D, dtype=torch.float64), temperature=-1.0)


def test_mask_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="token_mask"):
        run(make_layer(), torch.randn(B, S, D, dtype=torch.float64), mask=torch.ones(B, S + 1))


@pytest.mark.parametrize(("mode", "shape"), [("layer", (1,)), ("expert", (4,))])
def test_learnable_temperature_is_used_and_trained(mode, shape):
    layer = make_layer(learnable_temperature=mode, router_temperature=0.5)
    assert layer.log_temperature.shape == shape
    torch.testing.assert_close(layer.log_temperature.exp(), torch.full(shape, 0.5, dtype=torch.float64))
    x = torch.randn(B, S, D, dtype=torch.float64)
    before = run(layer, x)
    torch.testing.assert_close(before, reference_mot(layer, x, torch.ones(B, S), 0.5), rtol=1e-9, atol=1e-10)
    before.pow(2).sum().backward()
    assert layer.log_temperature.grad is not None and layer.log_temperature.grad.abs().sum() > 0
    with torch.no_grad():
        layer.log_temperature.fill_(0.0)  # T = 1
    torch.testing.assert_close(run(layer, x), reference_mot(layer, x, torch.ones(B, S), 1.0), rtol=1e-9, atol=1e-10)


def test_parameter_names_and_shapes_are_stable():
    layer = make_layer(expert_bias=True, learnable_temperature="expert")
    f = 3 * 128 // 4
    assert {name: tuple(p.shape) for name, p in layer.named_parameters()} == {
        "router.weight": (D, 4),
        "experts.up_proj": (4, D, f),
        "experts.down_proj": (4, f, D),
        "experts.up_proj_bias": (4, f),
        "experts.down_proj_bias": (4, D),
        "log_temperature": (4,),
    }


def test_init_follows_truncated_normal_with_paper_scale():
    layer = MoTGPTForCausalLM(tiny_config(n_embd=64, n_experts=64, group_size=16)).transformer.h[0].mlp
    experts = layer.experts
    for weight, fan_in in ((layer.router.weight, 64), (experts.up_proj, 64), (experts.down_proj, 16 * 256 // 64)):
        std = (0.1 / fan_in) ** 0.5
        assert weight.abs().max() <= 2 * std + 1e-7
        assert 0.7 * std < weight.std() < 1.0 * std  # a normal cut at 2 std has std ~0.88 of the original


def test_bf16_autocast_gives_finite_output_and_gradients():
    layer = MoTGPTForCausalLM(tiny_config()).transformer.h[0].mlp
    x = torch.randn(B, S, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(layer, x, random_mask())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.router.weight.grad).all()


def test_non_finite_padding_states_do_not_reach_real_tokens():
    layer = make_layer()
    x = torch.randn(B, S, D, dtype=torch.float64)
    mask = random_mask()
    poisoned = x.masked_fill(~mask.bool()[..., None], float("nan"))
    real = mask.bool()
    torch.testing.assert_close(run(layer, poisoned, mask)[real], run(layer, x, mask)[real], rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.5, torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])])
def test_unmasked_fast_path_equals_an_all_true_mask(temperature):
    logits = torch.randn(2, 4, 3, 6)
    all_true = torch.ones(2, 4, 3, 1, dtype=torch.bool)
    torch.testing.assert_close(mixing_weights(logits, None, temperature), mixing_weights(logits, all_true, temperature))


def test_temperatures_below_float32_range_stay_finite():
    layer = make_layer(learnable_temperature="expert").float()
    x = torch.randn(B, S, D)
    assert torch.isfinite(run(layer, x, temperature=5e-324)).all()
    with torch.no_grad():
        layer.log_temperature.fill_(-110.0)  # exp() underflows to 0 in float32
    torch.testing.assert_close(run(layer, x), run(layer, x, temperature=0.0))
