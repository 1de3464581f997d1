"""generate() and pipeline("text-generation") with MoT grouping."""

import json

import pytest
import torch
from helpers import lay_out_hub_cache, random_ids, run_without_package, tiny_config, tiny_tokenizer
from transformers import GenerationMixin, pipeline

from mixture_of_tokens import MoTGPTForCausalLM

B, L, NEW = 7, 6, 8  # groups of 3: B % G != 0
PROMPT_LENGTHS = [6, 4, 6, 3, 5, 6, 2]


def make_model(**overrides) -> MoTGPTForCausalLM:
    # float64: tests here compare greedy tokens from batches of other shapes (with and without the cache, alone and
    # in a batch), whose logits agree only up to rounding; in float64 no rounding difference can flip an argmax.
    return MoTGPTForCausalLM(tiny_config(**overrides)).double().eval()


def left_padded_prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(B, L, seed=seed)
    mask = torch.zeros(B, L, dtype=torch.long)
    for row, length in enumerate(PROMPT_LENGTHS):
        mask[row, L - length :] = 1
    return ids.masked_fill(mask == 0, 1), mask


def greedy(model, ids, mask=None, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": NEW, "do_sample": False} | kwargs
    return model.generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("eos_token_id", [None, 0])
def test_cached_greedy_generation_equals_recomputation(eos_token_id):
    model = make_model(eos_token_id=eos_token_id)
    ids, mask = left_padded_prompts()
    cached = greedy(model, ids, mask)
    assert cached.shape == (B, L + NEW)
    assert torch.equal(cached, greedy(model, ids, mask, use_cache=False))


def test_beam_search_cached_equals_recomputation():
    model = make_model()
    ids, mask = left_padded_prompts()
    beams = greedy(model, ids, mask, num_beams=3, max_new_tokens=5)
    assert beams.shape[0] == B
    assert torch.equal(beams, greedy(model, ids, mask, num_beams=3, max_new_tokens=5, use_cache=False))


def test_sampling_is_reproducible_with_a_seed():
    model = make_model()
    ids, mask = left_padded_prompts()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20))
    assert torch.equal(*runs)


def test_padding_content_does_not_change_generated_tokens():
    model = make_model()
    ids, mask = left_padded_prompts()
    other_padding = torch.where(mask.bool(), ids, random_ids(B, L, seed=5))
    assert torch.equal(greedy(model, ids, mask)[:, L:], greedy(model, other_padding, mask)[:, L:])


def scores_of_running_rows(generate, model, ids, eos_token_id, pad_token_id):
    out = generate(
        model,
        ids,
        attention_mask=torch.ones_like(ids),  # else generate would take prompt tokens equal to the pad id as padding
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    return out.sequences, torch.stack(out.scores, dim=1)


def finished_and_running(tokens: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that emit `eos` before the last step, and rows that never emit it."""
    return (tokens[:, :-1] == eos).any(dim=1), ~(tokens == eos).any(dim=1)


def shares_a_group(finished: torch.Tensor, running: torch.Tensor) -> bool:
    return any(finished[g : g + 3].any() and running[g : g + 3].any() for g in range(0, B, 3))


def test_finished_row_no_longer_changes_the_rows_still_running():
    model = make_model(eos_token_id=None)
    ids = random_ids(B, L)
    # An EOS id that ends a row early while another row of its group keeps running.
    candidates = greedy(model, ids)[:, L : L + NEW // 2].flatten().unique().tolist()
    eos = next(
        c for c in candidates if shares_a_group(*finished_and_running(greedy(model, ids, eos_token_id=c)[:, L:], c))
    )
    ours = [scores_of_running_rows(MoTGPTForCausalLM.generate, model, ids, eos, pad) for pad in (1, 2)]
    finished, running = finished_and_running(ours[0][0][:, L:], eos)
    assert shares_a_group(finished, running)
    assert not torch.equal(ours[0][0], ours[1][0]), "finished rows were fed different padding"
    assert torch.equal(ours[0][0][running], ours[1][0][running])
    torch.testing.assert_close(ours[0][1][running], ours[1][1][running], rtol=0, atol=0)
    # Without MoT's handling, what a finished row is fed leaks into its group.
    plain = [scores_of_running_rows(GenerationMixin.generate, model, ids, eos, pad) for pad in (1, 2)]
    assert not torch.allclose(plain[0][1][running], plain[1][1][running])


def test_router_temperature_keyword_sets_temperature_for_one_call():
    model = make_model(router_temperature=1.0)
    discrete = make_model(router_temperature=0.0)
    discrete.load_state_dict(model.state_dict())
    ids, mask = left_padded_prompts()
    at_zero = greedy(model, ids, mask, router_temperature=0.0, output_scores=True, return_dict_in_generate=True)
    expected = greedy(discrete, ids, mask, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(at_zero.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(at_zero.scores), torch.stack(expected.scores), rtol=0, atol=0)
    at_one = greedy(model, ids, mask, router_temperature=1.0, output_scores=True, return_dict_in_generate=True)
    default = greedy(model, ids, mask, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(at_one.scores), torch.stack(default.scores), rtol=0, atol=0)
    assert not torch.allclose(torch.stack(at_one.scores), torch.stack(at_zero.scores))


@pytest.mark.parametrize("temperature", [-0.5, "0.5", True])
def test_router_temperature_that_is_not_a_number_at_least_0_is_refused(temperature):
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="router_temperature"):
        greedy(make_model(), ids, mask, router_temperature=temperature)


def test_a_single_prompt_generates():
    out = greedy(make_model(), random_ids(1, L))
    assert out.shape == (1, L + NEW)


def test_fillers_give_the_prompt_the_outputs_of_a_teacher_forced_group():
    model = make_model()
    prompt, fillers = random_ids(1, L), random_ids(4, L + NEW, seed=7)
    generated = greedy(model, prompt, group_fillers=fillers)
    assert generated.shape == (1, L + NEW)
    assert torch.equal(generated, greedy(model, prompt, group_fillers=fillers))
    # The same group, run as one forward pass: the prompt's row with its generated tokens, fillers teacher-forced.
    group = torch.cat([generated, fillers[:2]])
    with torch.no_grad():
        predictions = model(group).logits[0, L - 1 : -1].argmax(-1)
    assert torch.equal(predictions, generated[0, L:])


def test_fillers_give_each_prompt_its_own_group():
    model = make_model()
    ids, mask = left_padded_prompts()
    fillers = random_ids(2, L + NEW, seed=8)
    together = greedy(model, ids[:3], mask[:3], group_fillers=fillers)
    for row in range(3):
        alone = greedy(model, ids[row : row + 1], mask[row : row + 1], group_fillers=fillers)
        assert torch.equal(together[row], alone[0])


@pytest.mark.parametrize(
    ("fillers", "kwargs", "match"),
    [
        (random_ids(1, L + NEW), {}, "group_size - 1"),
        (random_ids(2, L + NEW - 1), {}, "prompt tokens \\+ max_new_tokens"),
        (random_ids(2, L + NEW), {"num_beams": 2}, "num_beams"),
        (random_ids(2, L + NEW), {"return_dict_in_generate": True}, "return_dict_in_generate"),
    ],
)
def test_bad_fillers_are_refused(fillers, kwargs, match):
    with pytest.raises(ValueError, match=match):
        greedy(make_model(), random_ids(2, L), group_fillers=fillers, **kwargs)


PROMPTS = ["the nation of people", "we are", "they", "this is a nation that", "it was"]


def test_pipeline_from_model_object_batches_and_takes_router_temperature():
    tokenizer = tiny_tokenizer()
    model = make_model()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "batch_size": 3}
    outputs = generator(PROMPTS, **kwargs)
    assert len(outputs) == len(PROMPTS)
    assert all(out[0]["generated_text"].startswith(prompt) for out, prompt in zip(outputs, PROMPTS, strict=True))
    # The pipeline's first batch is the model's first group: generate on it directly gives the same tokens.
    batch = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    direct = model.generate(**batch, max_new_tokens=4, do_sample=False, router_temperature=0.0)
    via_pipeline = generator(PROMPTS[:3], router_temperature=0.0, return_tensors=True, **kwargs)
    assert [out[0]["generated_token_ids"] for out in via_pipeline] == direct.tolist()
    with pytest.raises(ValueError, match="router_temperature"):
        generator(PROMPTS, router_temperature=-1.0, **kwargs)


def test_pipeline_from_a_saved_folder(tmp_path):
    model, tokenizer = make_model(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "batch_size": 3}
    from_folder = pipeline("text-generation", model=str(tmp_path))(PROMPTS, **kwargs)
    from_object = pipeline("text-generation", model=model, tokenizer=tokenizer)(PROMPTS, **kwargs)
    assert from_folder == from_object


PIPELINE_SCRIPT = r"""
import json
from transformers import pipeline

generator = pipeline("text-generation", model="mot-org/tiny-mot", trust_remote_code=True)
out = generator(json.loads(sys.argv[1]), max_new_tokens=4, do_sample=False, batch_size=3, router_temperature=0.5)
print(json.dumps([o[0]["generated_text"] for o in out]))
"""


@pytest.mark.slow
def test_pipeline_from_an_offline_hub_repo_without_the_package(tmp_path):
    model, tokenizer = make_model(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    lay_out_hub_cache(tmp_path / "saved", tmp_path / "hub", "mot-org/tiny-mot")
    stdout = run_without_package(PIPELINE_SCRIPT, tmp_path / "hub", json.dumps(PROMPTS))
    remote = json.loads(stdout.strip().splitlines()[-1])
    local = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        PROMPTS, max_new_tokens=4, do_sample=False, batch_size=3, router_temperature=0.5
    )
    assert remote == [out[0]["generated_text"] for out in local]


def test_static_cache_and_embedding_prompts_generate_like_recomputation():
    model = make_model()
    ids, mask = left_padded_prompts()
    expected = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), expected)
    with torch.no_grad():
        embeds = model.transformer.wte(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(from_embeds, expected[:, L:])


def test_fillers_that_would_emit_eos_are_refused():
    fillers = random_ids(2, L + NEW, seed=7)
    fillers[1, L + 3] = 0  # the config's EOS id, fed after the prompt
    with pytest.raises(ValueError, match="must not hold an EOS id"):
        greedy(make_model(), random_ids(1, L), group_fillers=fillers)
