"""The whole MoTGPT model: invariants, outputs, Transformers features, training."""

from pathlib import Path

import pytest
import torch
from helpers import VOCAB_SIZE, random_ids, tiny_config
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from mixture_of_tokens import MoTGPTForCausalLM, MoTGPTModel, MoTLayer

B, S = 7, 9  # groups of 3: two full groups and a remainder of one row
FIXTURES = Path(__file__).parent / "fixtures"


def make_model(**overrides) -> MoTGPTForCausalLM:
    return MoTGPTForCausalLM(tiny_config(**overrides)).eval()


def left_padded_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, seq_len - length :] = 1
    return mask


LENGTHS = [9, 6, 9, 3, 8, 9, 5]


@torch.no_grad()
def logits(model, ids, mask=None, **kwargs) -> torch.Tensor:
    return model(ids, attention_mask=mask, **kwargs).logits


def test_blocks_use_mot_as_configured():
    blocks = make_model(n_layer=4, mot_layers="second_half").transformer.h
    assert [isinstance(block.mlp, MoTLayer) for block in blocks] == [False, False, True, True]
    model = make_model(n_layer=3, mot_layers=[1])
    assert [isinstance(block.mlp, MoTLayer) for block in model.transformer.h] == [False, True, False]


def test_dense_twin_equals_gpt2_with_the_same_weights():
    config = tiny_config(mot_layers=[])
    mot = MoTGPTForCausalLM(config).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.to_dict().items() if k in GPT2Config().to_dict()}))
    gpt2.load_state_dict(mot.state_dict())
    ids = random_ids(B, S)
    torch.testing.assert_close(logits(mot, ids), logits(gpt2.eval(), ids), rtol=0, atol=0)


def test_forward_returns_moe_output_with_loss_and_router_logits():
    model = make_model(n_layer=3, mot_layers=[0, 2])
    ids = random_ids(B, S)
    out = model(ids, labels=ids, output_router_logits=True, output_hidden_states=True)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    assert out.logits.shape == (B, S, VOCAB_SIZE)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.aux_loss is None
    assert len(out.router_logits) == 2 and all(r.shape == (B * S, 4) for r in out.router_logits)
    assert len(out.hidden_states) == 4
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    assert model(ids).router_logits is None


def test_router_logits_are_the_router_s_logits():
    model = make_model()
    ids = random_ids(B, S)
    captured = {}
    model.transformer.h[1].ln_2.register_forward_hook(lambda module, args, out: captured.update(x=out))
    router_logits = model(ids, output_router_logits=True).router_logits
    torch.testing.assert_close(
        router_logits[1], (captured["x"] @ model.transformer.h[1].mlp.router.weight).flatten(0, 1)
    )


def test_config_flag_turns_on_router_logits():
    model = make_model(output_router_logits=True)
    assert len(model(random_ids(B, S)).router_logits) == 2


def test_return_dict_false_gives_a_tuple():
    ids = random_ids(B, S)
    out = make_model()(ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape == (B, S, VOCAB_SIZE)


def test_logits_to_keep_slices_the_last_positions():
    model = make_model()
    ids = random_ids(B, S)
    full = logits(model, ids)
    torch.testing.assert_close(logits(model, ids, logits_to_keep=2), full[:, -2:])
    torch.testing.assert_close(logits(model, ids, logits_to_keep=torch.tensor([0, 4])), full[:, [0, 4]])


def test_embeddings_are_tied():
    model = make_model()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_eager_attention_returns_attentions():
    model = make_model(attn_implementation="eager")
    out = model(random_ids(B, S), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (B, 2, S, S)


def test_changing_a_later_token_leaves_earlier_logits_unchanged_in_every_row():
    model = make_model()
    ids = random_ids(B, S)
    changed = ids.clone()
    changed[:, 5:] = random_ids(B, S - 5, seed=1)
    changed[4, 4] = (ids[4, 4] + 1) % VOCAB_SIZE  # one row changed from position 4 on
    torch.testing.assert_close(logits(model, ids)[:, :4], logits(model, changed)[:, :4], rtol=0, atol=0)


def test_rows_in_other_groups_do_not_affect_a_group():
    model = make_model()
    ids = random_ids(B, S)
    changed = ids.clone()
    changed[3:] = random_ids(B - 3, S, seed=2)
    torch.testing.assert_close(logits(model, ids)[:3], logits(model, changed)[:3], rtol=1e-6, atol=1e-6)
    changed_in_group = ids.clone()
    changed_in_group[1] = random_ids(1, S, seed=3)
    assert not torch.allclose(logits(model, ids)[0], logits(model, changed_in_group)[0])


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_content_does_not_change_real_tokens(attn_implementation):
    model = make_model(attn_implementation=attn_implementation)
    mask = left_padded_mask(LENGTHS, S)
    ids = random_ids(B, S)
    changed = torch.where(mask.bool(), ids, random_ids(B, S, seed=4))
    real = mask.bool()
    out, out_changed = logits(model, ids, mask), logits(model, changed, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], out_changed[real], rtol=1e-6, atol=1e-6)


def test_full_groups_are_unchanged_by_rows_that_follow():
    model = make_model()
    ids = random_ids(B, S)
    full = logits(model, ids)
    torch.testing.assert_close(logits(model, ids[:6]), full[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, ids[:3]), full[:3], rtol=1e-5, atol=1e-5)


def test_permuting_rows_inside_a_group_permutes_their_logits():
    model = make_model()
    ids, mask = random_ids(B, S), left_padded_mask(LENGTHS, S)
    perm = torch.tensor([0, 1, 2, 5, 3, 4, 6])  # rotate group 1
    torch.testing.assert_close(
        logits(model, ids[perm], mask[perm]), logits(model, ids, mask)[perm], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_incremental_decoding_with_cache_equals_full_forward(attn_implementation):
    model = make_model(attn_implementation=attn_implementation)
    ids, mask = random_ids(B, S), left_padded_mask(LENGTHS, S)
    full = logits(model, ids, mask)
    prompt_len = 6
    with torch.no_grad():
        out = model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        assert isinstance(cache, DynamicCache)
        for position in range(prompt_len, S):
            out = model(
                ids[:, position : position + 1],
                attention_mask=mask[:, : position + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_per_call_router_temperature_overrides_config():
    model = make_model(router_temperature=1.0)
    cold = make_model(router_temperature=0.2)
    cold.load_state_dict(model.state_dict())
    ids = random_ids(B, S)
    torch.testing.assert_close(logits(model, ids, router_temperature=0.2), logits(cold, ids), rtol=0, atol=0)
    assert not torch.allclose(logits(model, ids), logits(cold, ids))
    assert torch.isfinite(logits(model, ids, router_temperature=0.0)).all()
    with pytest.raises(ValueError, match="router_temperature"):
        model(ids, router_temperature=-0.1)


def test_four_dimensional_mask_is_refused():
    with pytest.raises(ValueError, match="2-D padding mask"):
        make_model()(random_ids(B, S), attention_mask=torch.ones(B, 1, S, S))


def test_eager_and_sdpa_agree():
    eager = make_model(attn_implementation="eager")
    sdpa = make_model(attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    ids, mask = random_ids(B, S), left_padded_mask(LENGTHS, S)
    real = mask.bool()
    torch.testing.assert_close(logits(eager, ids, mask)[real], logits(sdpa, ids, mask)[real], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(learnable_temperature="expert").train()
    ids = random_ids(B, S)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.transformer.h[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_few_optimizer_steps_lower_the_loss():
    model = make_model(learnable_temperature="layer").train()
    ids = random_ids(6, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_bf16_autocast_training_step_has_no_nan():
    model = make_model().train()
    ids, mask = random_ids(B, S), left_padded_mask(LENGTHS, S)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_save_and_load_give_identical_logits(tmp_path):
    model = make_model(expert_bias=True, learnable_temperature="expert", mot_layers=[1])
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "configuration_mot.py",
        "modeling_mot.py",
    }
    ids = random_ids(B, S)
    for loader in (MoTGPTForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, MoTGPTForCausalLM)
        torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, MoTGPTModel)


def test_residual_projections_get_gpt2_scaled_init():
    model = make_model(n_layer=8, n_embd=64, mot_layers=[0])
    scaled = 0.02 / (2 * 8) ** 0.5
    for projection in (model.transformer.h[0].attn.c_proj, model.transformer.h[1].mlp.c_proj):
        assert abs(projection.weight.std().item() - scaled) < 0.15 * scaled
    assert abs(model.transformer.h[1].mlp.c_fc.weight.std().item() - 0.02) < 0.1 * 0.02


def test_experts_init_rule_for_dense_mlps_matches_the_experts():
    model = make_model(n_layer=2, n_embd=64, mot_layers=[0], mlp_init="experts", mot_init_scale=0.1)
    dense, experts = model.transformer.h[1].mlp, model.transformer.h[0].mlp
    for weight in (dense.c_fc.weight, dense.c_proj.weight, experts.experts.up_proj, experts.experts.down_proj):
        std = (0.1 / weight.shape[-2]) ** 0.5  # fan_in: Conv1D weights are (in, out), experts (E, in, out)
        assert weight.abs().max() <= 2 * std + 1e-7
        assert 0.75 * std < weight.std() < 0.95 * std  # a normal cut at 2 std has std ~0.88 of the original
    assert not dense.c_fc.bias.any() and not dense.c_proj.bias.any()
    attention = model.transformer.h[1].attn.c_attn.weight  # attention keeps GPT-2's init
    assert abs(attention.std().item() - 0.02) < 0.1 * 0.02


def test_sequences_packed_into_one_row_are_refused_by_mot():
    ids = random_ids(1, 12)
    packed = torch.cat([torch.arange(5), torch.arange(7)])[None]  # two sequences, positions restart
    with pytest.raises(ValueError, match="packed into one row.*padding_free=False"):
        make_model()(ids, position_ids=packed)
    with pytest.raises(ValueError, match="packed into one row"):
        make_model()(ids, cu_seq_lens_q=torch.tensor([0, 5, 12]))
    dense = make_model(mot_layers=[])
    assert torch.isfinite(logits(dense, ids, position_ids=packed)).all()  # no groups: packing is fine


def test_left_padding_is_not_taken_for_packing():
    mask = left_padded_mask(LENGTHS, S)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate builds: 1, 1, 0, 1, 2, ...
    assert torch.isfinite(logits(make_model(), random_ids(B, S), mask, position_ids=position_ids)).all()


def test_first_training_batch_smaller_than_a_group_is_refused_and_later_partial_batches_train():
    model = MoTGPTForCausalLM(tiny_config()).train()
    with pytest.raises(ValueError, match="fewer than the model's group_size=3.*per_device_train_batch_size"):
        model(random_ids(2, S), labels=random_ids(2, S))
    with torch.no_grad():
        model(random_ids(1, S))  # inference in train mode is not a training step
    model(random_ids(6, S), labels=random_ids(6, S)).loss.backward()
    model(random_ids(2, S), labels=random_ids(2, S)).loss.backward()  # an epoch's partial last batch
    assert make_model(mot_layers=[]).train()(random_ids(1, S), labels=random_ids(1, S)).loss.requires_grad


@pytest.mark.parametrize("ffn_type", ["mot", "token_choice"])
def test_a_checkpoint_with_the_legacy_weight_names_loads_and_is_saved_with_the_new_ones(ffn_type, tmp_path):
    # Written by the code before the expert layers had router and experts modules (controller, w_in, w_out, b_in,
    # b_out, router_bias), with a learned temperature or a router bias and expert biases, and the logits it gave.
    folder = FIXTURES / f"legacy_{ffn_type}"
    expected = load_file(folder / "expected.safetensors")
    model = MoTGPTForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert {"transformer.h.0.mlp.router.weight", "transformer.h.0.mlp.experts.up_proj"} <= set(saved)
    assert not [name for name in saved if name.endswith(("controller", "w_in", "w_out", "b_in", "b_out"))]
    with torch.no_grad():
        reloaded = MoTGPTForCausalLM.from_pretrained(tmp_path).eval()(expected["input_ids"]).logits
    torch.testing.assert_close(reloaded, expected["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ffn_type", ["mot", "token_choice"])
def test_load_state_dict_renames_the_legacy_weight_names_as_trainer_resuming_needs(ffn_type):
    # `Trainer` resumes a checkpoint with `model.load_state_dict`, not `from_pretrained`.
    folder = FIXTURES / f"legacy_{ffn_type}"
    expected = load_file(folder / "expected.safetensors")
    model = MoTGPTForCausalLM(MoTGPTForCausalLM.config_class.from_pretrained(folder)).eval()
    result = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-6)
