"""Continuous batching (`generate_batch`, the engine of `transformers serve --continuous-batching`) flattens every
request into one row: models without groups give `generate`'s tokens through it, a MoT model refuses it."""

import pytest
import torch
from helpers import random_ids, tiny_config
from transformers import ContinuousBatchingConfig, GenerationConfig

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.conversion import mot_to_token_choice

PROMPTS = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 9, 3, 7)]
NO_GROUPS = {
    "dense": lambda: MoTGPTForCausalLM(tiny_config(mot_layers=[])),
    "token_choice": lambda: MoTGPTForCausalLM(
        tiny_config(ffn_type="token_choice", num_experts_per_tok=2, capacity_factor=None)
    ),
    "transition_tuned": lambda: mot_to_token_choice(MoTGPTForCausalLM(tiny_config(n_experts=6))),
}


def greedy(max_new_tokens: int = 6) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=0, pad_token_id=1)


# A paged cache sized for these prompts: by default it is sized from the free memory, and filling it takes seconds.
SMALL_CACHE = ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=64)


@pytest.mark.parametrize("kind", sorted(NO_GROUPS))
def test_models_without_groups_give_generates_tokens_through_continuous_batching(kind):
    model = NO_GROUPS[kind]().eval()
    assert not model.config.uses_groups
    outputs = model.generate_batch(inputs=PROMPTS, generation_config=greedy(), continuous_batching_config=SMALL_CACHE)
    served = [output.generated_tokens for output in sorted(outputs.values(), key=lambda o: int(o.request_id[4:]))]
    with torch.no_grad():
        alone = [model.generate(torch.tensor([p]), generation_config=greedy())[0] for p in PROMPTS]
    expected = [tokens[len(p) :].tolist() for tokens, p in zip(alone, PROMPTS, strict=True)]
    assert served == expected
    assert all(len(tokens) > 0 for tokens in served)


@pytest.mark.parametrize("ffn_type", ["mot", "uniform_mot", "expert_choice"])
def test_models_with_groups_refuse_continuous_batching_where_the_caller_sees_it(ffn_type):
    model = MoTGPTForCausalLM(tiny_config(ffn_type=ffn_type, n_experts=3)).eval()
    with pytest.raises(ValueError, match="mot-serve.*mot-transition-tune"):
        model.generate_batch(inputs=PROMPTS, generation_config=greedy())
    with pytest.raises(ValueError, match="continuous batching"):
        model.init_continuous_batching(generation_config=greedy())


def test_a_4d_mask_is_refused_by_mot_and_taken_by_a_model_without_groups():
    ids = random_ids(3, 5)
    mask = torch.ones(3, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D padding mask.*got a 4-D"):
        MoTGPTForCausalLM(tiny_config()).eval()(ids, attention_mask=mask)
    dense = MoTGPTForCausalLM(tiny_config(mot_layers=[])).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids, attention_mask=mask).logits, dense(ids).logits)
