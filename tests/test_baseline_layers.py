"""The baseline feed-forward layers: uniform-routing MoT, Token Choice and Expert Choice MoE."""

import math

import pytest
import torch
from helpers import random_ids, tiny_config

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.card import flops_per_token
from mixture_of_tokens.modeling_mot import ExpertChoiceLayer, MoTLayer, TokenChoiceLayer

B, S, D = 7, 5, 32


def make_layer(**overrides):
    model = MoTGPTForCausalLM(tiny_config(**overrides))
    model.set_experts_implementation("eager")  # torch's grouped_mm kernel takes no float64
    return model.transformer.h[0].mlp.double().eval()


def expert_mlp(layer, e: int, token: torch.Tensor) -> torch.Tensor:
    experts = layer.experts
    return experts.act_fn(token @ experts.up_proj[e]) @ experts.down_proj[e]


def reference_token_choice(layer: TokenChoiceLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain loops: top-k per token, gates renormalized; capacity filled position by position, first choices first."""
    tokens, real = x.transpose(0, 1).reshape(-1, x.shape[-1]), mask.T.reshape(-1).bool()
    n_experts, k = layer.experts.num_experts, layer.num_experts_per_tok
    probs = torch.softmax(tokens @ layer.router.weight, dim=-1)
    gates, chosen = probs.topk(k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True) if k > 1 else gates
    n_real = int(real.sum())
    capacity = n_real if layer.capacity_factor is None else math.ceil(layer.capacity_factor * n_real * k / n_experts)
    load = [0] * n_experts
    out = torch.zeros_like(tokens)
    batch_size = x.shape[0]
    for position in range(x.shape[1]):
        for choice in range(k):
            for t in range(position * batch_size, (position + 1) * batch_size):
                e = int(chosen[t, choice])
                if real[t] and load[e] < capacity:
                    load[e] += 1
                    out[t] += gates[t, choice] * expert_mlp(layer, e, tokens[t])
    return out.view(x.shape[1], x.shape[0], -1).transpose(0, 1)


def reference_expert_choice(layer: ExpertChoiceLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain loops: in each group of rows at each position, each expert takes its best real tokens."""
    out = torch.zeros_like(x)
    for start in range(0, x.shape[0], layer.group_size):
        rows = [r for r in range(start, min(start + layer.group_size, x.shape[0]))]
        for s in range(x.shape[1]):
            scores = torch.softmax(x[rows, s] @ layer.router.weight, dim=-1)  # (g, E)
            for e in range(scores.shape[1]):
                ranked = [i for i in scores[:, e].argsort(descending=True).tolist() if mask[rows[i], s]]
                for i in ranked[: layer.capacity]:
                    out[rows[i], s] += scores[i, e] * expert_mlp(layer, e, x[rows[i], s])
    return out


def padding_mask(seed: int = 1) -> torch.Tensor:
    return (torch.rand(B, S, generator=torch.Generator().manual_seed(seed)) > 0.3).long()


@pytest.mark.parametrize(("k", "capacity_factor"), [(1, 1.0), (2, 1.0), (1, 0.5), (2, None)])
def test_token_choice_equals_a_loop_with_capacity_and_dropping(k, capacity_factor):
    layer = make_layer(ffn_type="token_choice", num_experts_per_tok=k, capacity_factor=capacity_factor)
    x, mask = torch.randn(B, S, D, dtype=torch.float64), padding_mask()
    torch.testing.assert_close(layer(x, token_mask=mask), reference_token_choice(layer, x, mask), rtol=1e-9, atol=1e-10)


def test_token_choice_drops_tokens_beyond_capacity():
    layer = make_layer(ffn_type="token_choice", capacity_factor=0.25)  # 35 tokens, 4 experts: capacity 3
    update = layer(torch.randn(B, S, D, dtype=torch.float64))
    processed = (update.abs().sum(-1) > 0).sum().item()
    assert processed <= 4 * math.ceil(0.25 * B * S / 4) < B * S


@pytest.mark.parametrize(("k", "capacity_factor"), [(2, 1.0), (4, 1.0), (1, 2.0)])
def test_expert_choice_picks_per_group_and_equals_a_loop(k, capacity_factor):
    layer = make_layer(ffn_type="expert_choice", num_experts_per_tok=k, capacity_factor=capacity_factor)
    assert layer.capacity == min(3, math.ceil(capacity_factor * 3 * k / 4))
    x, mask = torch.randn(B, S, D, dtype=torch.float64), padding_mask()
    torch.testing.assert_close(
        layer(x, token_mask=mask), reference_expert_choice(layer, x, mask), rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize("ffn_type", ["token_choice", "expert_choice", "uniform_mot"])
def test_masked_tokens_get_nothing_and_change_nothing(ffn_type):
    layer = make_layer(ffn_type=ffn_type, num_experts_per_tok=2)
    x, mask = torch.randn(B, S, D, dtype=torch.float64), padding_mask()
    changed = torch.where(mask.bool()[..., None], x, 50 * torch.randn_like(x))
    out, out_changed = layer(x, token_mask=mask), layer(changed, token_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], out_changed[real], rtol=0, atol=0)
    assert torch.all(out[~real] == 0)


def test_uniform_mot_averages_its_group_and_has_no_router():
    layer = make_layer(ffn_type="uniform_mot")
    assert isinstance(layer, MoTLayer) and layer.router is None
    x = torch.randn(3, S, D, dtype=torch.float64)  # one full group
    expected = sum(expert_mlp(layer, e, x.mean(dim=0)) for e in range(4)) / 3
    torch.testing.assert_close(layer(x), expected.expand(3, -1, -1), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("ffn_type", "k", "width"),
    [("mot", 1, 3 * 128 // 4), ("uniform_mot", 1, 3 * 128 // 4), ("token_choice", 1, 128), ("token_choice", 2, 64),
     ("expert_choice", 2, 64)],
)  # fmt: skip
def test_expert_widths_match_the_dense_flops_per_token(ffn_type, k, width):
    config = tiny_config(ffn_type=ffn_type, num_experts_per_tok=k, group_size=4)
    width = width * 4 // 3 if ffn_type in ("mot", "uniform_mot") else width
    assert config.expert_size_resolved == width
    # Expert passes per token: a MoT group of G tokens makes E mixtures; a Token/Expert Choice token meets k experts.
    passes = config.n_experts / config.group_size if ffn_type in ("mot", "uniform_mot") else k
    assert 2 * 2 * config.n_embd * width * passes == 2 * 2 * config.n_embd * config.d_ff


@pytest.mark.parametrize("ffn_type", ["token_choice", "expert_choice", "uniform_mot"])
def test_model_trains_with_gradients_everywhere_and_stays_causal(ffn_type):
    model = MoTGPTForCausalLM(tiny_config(ffn_type=ffn_type, num_experts_per_tok=2))
    ids = random_ids(B, 9)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    changed = ids.clone()
    changed[:, 6:] = random_ids(B, 3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :6], model(changed).logits[:, :6], rtol=0, atol=0)


def test_token_choice_aux_loss_reaches_the_model_loss():
    model = MoTGPTForCausalLM(tiny_config(ffn_type="token_choice", router_aux_loss_coef=0.5)).eval()
    ids = random_ids(B, 9)
    with torch.no_grad():
        plain = model(ids, labels=ids)
        with_aux = model(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and with_aux.aux_loss > 0
    torch.testing.assert_close(with_aux.loss, plain.loss + 0.5 * with_aux.aux_loss)
    assert MoTGPTForCausalLM(tiny_config()).eval()(ids, labels=ids, output_router_logits=True).aux_loss is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"ffn_type": "switch"}, "ffn_type"), ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
     ({"capacity_factor": 0}, "capacity_factor"), ({"ffn_type": "token_choice", "num_experts_per_tok": 3},
                                                    "expert_size")],
)  # fmt: skip
def test_invalid_baseline_fields_are_refused(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        tiny_config(**overrides)


def test_expert_choice_needs_a_token_per_expert_and_group():
    with pytest.raises(ValueError, match="needs at least 1"):
        tiny_config(ffn_type="expert_choice", n_experts=8, expert_size=16)  # groups of 3 rows, 8 experts


@pytest.mark.parametrize("ffn_type", ["mot", "uniform_mot", "token_choice", "expert_choice"])
def test_flops_per_token_equal_the_dense_twin_up_to_routing(ffn_type):
    config = tiny_config(ffn_type=ffn_type, group_size=4)
    model, dense = MoTGPTForCausalLM(config), MoTGPTForCausalLM(tiny_config(mot_layers=[]))
    d, d_ff, n_experts = config.n_embd, config.d_ff, config.n_experts
    router = 0 if ffn_type == "uniform_mot" else d * n_experts
    mixing = 4 * n_experts * d if ffn_type in ("mot", "uniform_mot") else 0  # mix + redistribute, 2 FLOPs each
    # The experts' active weights equal the dense MLP's; the dense MLP alone has biases (d_ff + d).
    per_layer = 2 * (router - d_ff - d) + mixing
    assert flops_per_token(model) - flops_per_token(dense) == config.n_layer * per_layer
