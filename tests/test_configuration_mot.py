import pytest
from helpers import tiny_config

from mixture_of_tokens import MoTGPTConfig


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"router_temperature": ".5"}, "router_temperature"),  # a command-line value that is not JSON
        ({"mot_init_scale": "0.1x"}, "mot_init_scale"),
        ({"capacity_factor": "1"}, "capacity_factor"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"n_experts": 2.5}, "n_experts"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": True}, "group_size"),
        ({"expert_size": 0}, "expert_size"),
        ({"expert_size": -3}, "expert_size"),
        ({"n_experts": 5}, "expert_size"),  # 3 * 128 / 5 is not a whole number
        ({"mot_layers": "first_half"}, "mot_layers"),
        ({"mot_layers": [2]}, "mot_layers"),
        ({"mot_layers": [-1]}, "mot_layers"),
        ({"mot_layers": [0, 0]}, "mot_layers"),
        ({"router_temperature": -0.5}, "router_temperature"),
        ({"router_temperature": float("nan")}, "router_temperature"),
        ({"learnable_temperature": "global"}, "learnable_temperature"),
        ({"learnable_temperature": "layer", "router_temperature": 0.0}, "learnable_temperature"),
        ({"expert_activation": "not_an_activation"}, "expert_activation"),
        ({"mot_init_scale": 0.0}, "mot_init_scale"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"mlp_init": "xavier"}, "mlp_init"),
        ({"mot_emit_weights": "tokens"}, "mot_emit_weights"),
        ({"mot_emit_weights": "experts", "ffn_type": "uniform_mot"}, "mot_emit_weights"),
    ],
)
def test_invalid_field_raises_value_error_naming_it(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        tiny_config(**overrides)


def test_invalid_value_is_quoted_in_the_error():
    with pytest.raises(ValueError, match="got 'first_half'"):
        tiny_config(mot_layers="first_half")


def test_expert_size_defaults_to_flop_matched_width():
    config = tiny_config(n_embd=32, n_experts=4, group_size=3)
    assert config.d_ff == 128
    assert config.expert_size_resolved == 3 * 128 // 4
    assert tiny_config(n_inner=64).expert_size_resolved == 3 * 64 // 4
    assert tiny_config(expert_size=7).expert_size_resolved == 7


@pytest.mark.parametrize(
    ("mot_layers", "n_layer", "expected"),
    [
        ("all", 4, [0, 1, 2, 3]),
        ("second_half", 4, [2, 3]),
        ("second_half", 5, [2, 3, 4]),
        ([3, 1], 4, [1, 3]),
        ([], 4, []),
    ],
)
def test_mot_layer_indices(mot_layers, n_layer, expected):
    assert tiny_config(mot_layers=mot_layers, n_layer=n_layer).mot_layer_indices == expected


def test_json_round_trip_keeps_every_field(tmp_path):
    config = tiny_config(
        mot_layers=[1],
        router_temperature=0.5,
        learnable_temperature="expert",
        expert_activation="gelu_new",
        expert_bias=True,
        expert_size=16,
        mot_init_scale=0.2,
    )
    config.save_pretrained(tmp_path)
    reloaded = MoTGPTConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.mot_layers == [1] and reloaded.learnable_temperature == "expert"


def test_saved_config_maps_every_auto_class():
    assert tiny_config().auto_map == {
        "AutoConfig": "configuration_mot.MoTGPTConfig",
        "AutoModel": "modeling_mot.MoTGPTModel",
        "AutoModelForCausalLM": "modeling_mot.MoTGPTForCausalLM",
    }


def test_auto_config_resolves_model_type(tmp_path):
    from transformers import AutoConfig

    tiny_config().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MoTGPTConfig)


def test_moe_names_of_other_models_resolve_to_ours():
    config = tiny_config()  # E 4, G 3, d_ff 128: FLOP-matched experts 3 * 128 / 4 = 96 wide
    assert (config.num_experts, config.num_local_experts, config.moe_intermediate_size) == (4, 4, 96)
    assert config.get_text_config().num_experts == 4  # where TRL reads it
    renamed = tiny_config(num_local_experts=6, moe_intermediate_size=40)
    assert (renamed.n_experts, renamed.expert_size) == (6, 40)
    assert "num_experts" not in renamed.to_dict()


@pytest.mark.parametrize(("ffn_type", "coef"), [("mot", 0.0), ("uniform_mot", 0.0), ("expert_choice", 0.0),
                                                ("token_choice", 0.01)])  # fmt: skip
def test_only_token_choice_gets_a_load_balancing_coefficient(ffn_type, coef):
    config = tiny_config(ffn_type=ffn_type, n_experts=3)
    assert config.router_aux_loss_coef == coef
    assert MoTGPTConfig.from_dict(config.to_dict()).router_aux_loss_coef == coef


@pytest.mark.parametrize("ffn_type", ["mot", "uniform_mot", "expert_choice"])
def test_a_load_balancing_coefficient_for_a_balanced_layer_is_refused(ffn_type):
    with pytest.raises(ValueError, match="only for ffn_type='token_choice'"):
        tiny_config(ffn_type=ffn_type, n_experts=3, router_aux_loss_coef=0.01)
