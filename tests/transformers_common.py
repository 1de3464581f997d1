"""transformers' own model test mixins, importable by the suite.

`scripts/setup_env.sh` extracts the top-level `tests/test_*.py` of the transformers 5.23.0 source distribution (from
the package registry) into `.cache/transformers-5.23.0-tests/transformers_tests/`. `test_modeling_common.py` imports
three modules the sdist does not ship (`generation/test_utils.py`, `exporters/test_export.py`,
`utils/test_configuration_utils.py`); the project's equivalents below stand in for them.
"""

import sys
import types
from pathlib import Path

import pytest
import torch

SDIST_TESTS = Path(__file__).resolve().parents[1] / ".cache" / "transformers-5.23.0-tests"


class GenerationTesterMixin:
    """Stands in for transformers' `GenerationTesterMixin` (not in the sdist). Its properties are tested by the
    project, at group level where MoT's groups matter: greedy and sampled decoding, cache against recomputation,
    left padding, beam search and assisted decoding in `tests/test_generation.py`; fillers in `tests/test_fillers.py`;
    static-cache compiled decoding in `tests/test_compile.py`. Here, one check on each config: greedy `generate` with
    a cache gives the tokens of a loop of full forward passes."""

    def test_greedy_generate_matches_a_loop_of_forward_passes(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_generative_model_classes:
            model = model_class(config).eval()
            ids = inputs["input_ids"]
            generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
            tokens = ids
            for _ in range(4):
                next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, next_token], dim=1)
            self.assertTrue(torch.equal(generated, tokens))


class ExportTesterMixin:
    """Stands in for transformers' `ExportTesterMixin` (not in the sdist): `tests/test_compile.py` exports the forward
    and static- and dynamic-cache generation of MoT, dense and Token Choice models and checks their outputs."""


# transformers' `config_common_kwargs`: a value other than the default for each field every config has.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "architectures": ["MoTGPTForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "bos_token_id": 7,
    "eos_token_id": 8,
    "pad_token_id": 9,
}


def import_transformers_tests() -> types.ModuleType:
    """The `transformers_tests` package (the sdist's tests), with the project's stand-ins for the modules it lacks.
    Fails, naming the command that lays it out, when it is missing (a skip would let CI pass without the mixins)."""
    if not (SDIST_TESTS / "transformers_tests" / "test_modeling_common.py").is_file():
        pytest.fail(f"transformers' test mixins are not in {SDIST_TESTS}: run `source scripts/setup_env.sh`")
    if str(SDIST_TESTS) not in sys.path:
        sys.path.insert(0, str(SDIST_TESTS))
    stand_ins = {
        "transformers_tests.generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "transformers_tests.exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "transformers_tests.utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
    }
    for name, attributes in stand_ins.items():
        package = name.rsplit(".", 1)[0]
        sys.modules.setdefault(package, types.ModuleType(package))
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attributes)
    import transformers_tests

    return transformers_tests
