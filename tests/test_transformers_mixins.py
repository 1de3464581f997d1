"""transformers' common model tests (`ModelTesterMixin`, `ConfigTester` of transformers 5.23.0) on tiny MoT (groups
of 2 and of 4 rows), dense-twin and dropless Token Choice configs, as a model inside transformers is tested.

The mixins come from transformers' source distribution (laid out by `scripts/setup_env.sh`, see
`transformers_common.py`). Tests that cannot hold for a model whose rows depend on the rows grouped with them are
skipped in `BATCH_DEPENDENT`, each naming the project test that covers the same property at group level.
"""

import unittest

import pytest
import torch
from helpers import tiny_config
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers_common import GenerationTesterMixin, import_transformers_tests

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM, MoTGPTModel

import_transformers_tests()
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def listed_in_transformers_auto_mappings():
    """The mixins find a class's role (base model, causal LM head) in transformers' auto mappings, by name, where a
    model inside transformers is listed (models/auto/modeling_auto.py): MoTGPT is listed there for this module's
    tests only."""
    mappings = ((MODEL_MAPPING_NAMES, "MoTGPTModel"), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "MoTGPTForCausalLM"))
    for mapping, name in mappings:
        mapping[MoTGPTConfig.model_type] = name
    yield
    for mapping, _ in mappings:
        del mapping[MoTGPTConfig.model_type]


KINDS = {
    "mot_g2": {"group_size": 2, "n_experts": 4},
    "mot_g4": {"group_size": 4, "n_experts": 8},
    "dense": {"mot_layers": []},
    "token_choice": {"ffn_type": "token_choice", "n_experts": 4, "num_experts_per_tok": 2, "capacity_factor": None},
}

# Tests of properties a batch-dependent model does not have by design, and where the project tests them for groups.
BATCH_DEPENDENT = {
    "test_batching_equivalence": "a row's output depends on its group; at group level, tests/test_modeling_mot.py::"
    "test_rows_in_other_groups_do_not_affect_a_group and ::test_full_groups_are_unchanged_by_rows_that_follow",
}
# Tests of transformers' experts interface (grouped_mm and batched_mm against eager): only Token Choice's experts are
# behind it, so they run on the Token Choice config; MoT's and the dense MLP have no other implementation to compare.
EXPERTS_INTERFACE = {
    f"test_eager_matches_batched_and_grouped_inference_{i}_{dtype}": "no layer behind transformers' experts "
    "interface (only Token Choice's; the token_choice config runs this test)"
    for i, dtype in enumerate(("fp16", "fp32", "bf16"))
}
# A config with no expert layer has no router: `output_router_logits` gives an empty tuple.
NO_ROUTER = {"test_output_router_logits_from_config": "no expert layer, so no router logits (the MoT and Token Choice "
             "configs run this test)"}  # fmt: skip


class MoTGPTModelTester:
    """Tiny configs and inputs for the mixins: a batch of 4 rows (whole groups of 2 and of 4), padded on the left."""

    def __init__(self, parent: unittest.TestCase, overrides: dict):
        self.parent = parent
        self.overrides = overrides
        self.batch_size, self.seq_length, self.vocab_size = 4, 7, 99
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.is_training = True

    def get_config(self) -> MoTGPTConfig:
        sizes = dict(n_embd=self.hidden_size, n_layer=self.num_hidden_layers, n_head=self.num_attention_heads)
        special_ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return tiny_config(vocab_size=self.vocab_size, **sizes, **special_ids, **self.overrides)

    def prepare_config_and_inputs_for_common(self) -> tuple[MoTGPTConfig, dict]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3  # no special ids
        attention_mask = torch.ones_like(input_ids)
        attention_mask[-1, :2] = 0
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


def mixin_test_case(kind: str) -> type:
    class MoTGPTCommonTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        all_model_classes = (MoTGPTModel, MoTGPTForCausalLM)
        test_resize_embeddings = True
        test_all_params_have_gradient = kind != "token_choice"  # its unchosen experts get no gradient in a step

        def setUp(self):
            self.model_tester = MoTGPTModelTester(self, KINDS[kind])
            self.config_tester = ConfigTester(self, config_class=MoTGPTConfig, n_embd=37)

        def test_config(self):
            self.config_tester.run_common_tests()

    skips = (BATCH_DEPENDENT if kind.startswith("mot") else {}) | (EXPERTS_INTERFACE if kind != "token_choice" else {})
    skips |= NO_ROUTER if kind == "dense" else {}
    for name, why in skips.items():
        setattr(MoTGPTCommonTest, name, unittest.skip(why)(getattr(MoTGPTCommonTest, name)))
    MoTGPTCommonTest.__name__ = MoTGPTCommonTest.__qualname__ = f"MoTGPTCommonTest_{kind}"
    return MoTGPTCommonTest


for _kind in KINDS:
    globals()[f"MoTGPTCommonTest_{_kind}"] = mixin_test_case(_kind)
