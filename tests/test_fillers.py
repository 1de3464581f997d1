"""The filler bank as part of the model: saved and loaded with it, kept by trainers, completing lone prompts' groups
by default; `mot-fillers`; the warnings without a bank; engines that cannot group refused."""

import logging

import pytest
import torch
from datasets import Dataset
from helpers import WORDS, lay_out_hub_cache, random_ids, tiny_config, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TextIteratorStreamer, pipeline
from trl import SFTConfig, SFTTrainer

from mixture_of_tokens import MoTGPTForCausalLM, fillers
from mixture_of_tokens.modeling_mot import FILLER_FILE

G, L = 3, 40  # tiny_config's group size; filler rows long enough for a prompt and its new tokens


def bank(rows: int = G - 1, length: int = L, seed: int = 1) -> torch.Tensor:
    """Filler rows of ids in [2, 30): no EOS (0) or pad (1)."""
    return torch.randint(2, 30, (rows, length), generator=torch.Generator().manual_seed(seed))


def model_with_bank(**overrides) -> MoTGPTForCausalLM:
    # float64: greedy tokens are compared across batches of other shapes (equal logits up to rounding).
    model = MoTGPTForCausalLM(tiny_config(n_positions=64, **overrides)).double().eval()
    model.set_group_fillers(bank())
    return model


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, **kwargs)


def rows_per_forward(model) -> list[int]:
    """The batch size of every forward pass of the backbone, recorded from now on."""
    rows = []
    model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(args[0] if args else kwargs["input_ids"])), with_kwargs=True
    )
    return rows


def test_the_bank_is_saved_with_the_model_and_loaded_from_a_folder_and_the_hub(tmp_path):
    model = model_with_bank()
    model.save_pretrained(tmp_path / "folder")
    assert (tmp_path / "folder" / FILLER_FILE).is_file()
    assert torch.equal(MoTGPTForCausalLM.from_pretrained(tmp_path / "folder").group_fillers, bank())
    lay_out_hub_cache(tmp_path / "folder", tmp_path / "hub", "mot-org/banked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        loaded = AutoModelForCausalLM.from_pretrained("mot-org/banked", cache_dir=str(tmp_path / "hub"))
    assert torch.equal(loaded.group_fillers, bank())
    loaded, info = MoTGPTForCausalLM.from_pretrained(tmp_path / "folder", output_loading_info=True)
    assert torch.equal(loaded.group_fillers, bank()) and not info["missing_keys"]
    model.save_pretrained(tmp_path / "outer" / "inner")
    inner = MoTGPTForCausalLM.from_pretrained(tmp_path / "outer", subfolder="inner")
    assert torch.equal(inner.group_fillers, bank())
    without = MoTGPTForCausalLM(tiny_config())
    without.save_pretrained(tmp_path / "folder")  # over the banked checkpoint: its bank file goes too
    assert not (tmp_path / "folder" / FILLER_FILE).exists()
    assert MoTGPTForCausalLM.from_pretrained(tmp_path / "folder").group_fillers is None


@pytest.mark.parametrize(
    ("fillers", "message"),
    [(torch.ones(1, L, dtype=torch.long) * 5, "at least group_size - 1 = 2 rows"),
     (torch.full((2, L), 97), r"token ids in \[0, vocab_size=97\)"),
     (torch.zeros(2, L, dtype=torch.long), "must not hold an EOS id")],
    ids=["too-few-rows", "out-of-vocabulary", "eos"],
)  # fmt: skip
def test_a_bad_bank_is_refused(fillers, message):
    with pytest.raises(ValueError, match=message):
        MoTGPTForCausalLM(tiny_config()).set_group_fillers(fillers)


def test_a_lone_prompt_is_completed_with_the_bank_by_default_and_the_opt_out_runs_it_alone():
    model = model_with_bank()
    prompt = random_ids(1, 5)
    rows = rows_per_forward(model)
    completed = greedy(model, prompt)
    assert set(rows) == {G}  # the prompt and 2 filler rows, at every step
    torch.testing.assert_close(completed, greedy(model, prompt, group_fillers=bank()), rtol=0, atol=0)
    rows.clear()
    assert greedy(model, prompt, complete_groups=False).shape == completed.shape
    assert set(rows) == {1}


def test_only_the_incomplete_last_group_is_completed_and_each_of_its_rows_gets_a_group():
    model = model_with_bank()
    ids = random_ids(G + 2, 5)  # one full group, then two rows
    rows = rows_per_forward(model)
    out = greedy(model, ids)
    assert set(rows) == {G + 2 * G}
    torch.testing.assert_close(out[:G], greedy(model, ids[:G]), rtol=0, atol=0)
    for row in (G, G + 1):
        torch.testing.assert_close(out[row], greedy(model, ids[row : row + 1])[0], rtol=0, atol=0)


def test_a_pipeline_and_a_streamer_get_the_lone_prompt_s_completed_answer():
    model, tokenizer = model_with_bank(), tiny_tokenizer()
    prompt = "the nation of the people"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = greedy(model, ids, group_fillers=bank())[0, ids.shape[1] :]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_tensors=True)
    assert out[0]["generated_token_ids"][ids.shape[1] :] == expected.tolist()
    # `transformers serve` streams what `generate` decodes: the streamer sees the prompt's row only.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    greedy(model, ids, streamer=streamer)
    assert "".join(streamer).split() == tokenizer.decode(expected).split()


def test_without_a_bank_generate_and_forward_warn_once(caplog):
    model = MoTGPTForCausalLM(tiny_config()).eval()
    with caplog.at_level(logging.WARNING):
        greedy(model, random_ids(1, 5))
        greedy(model, random_ids(2, 5))
    assert len([r for r in caplog.records if "no filler bank" in r.getMessage()]) == 1
    assert "+76% perplexity" in caplog.text and "mot-fillers" in caplog.text
    caplog.clear()
    other = MoTGPTForCausalLM(tiny_config()).eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        other(random_ids(4, 5))  # a full group and a group of one
        other(random_ids(1, 5))
        other(random_ids(G, 5))  # whole groups: nothing to say
    assert len([r for r in caplog.records if "no filler bank" in r.getMessage()]) == 1


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)) for i in range(n)]


def test_the_bank_survives_sft_trainer_and_a_peft_merge(tmp_path):
    model = model_with_bank()
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=G, max_length=16,
                     save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, bf16=False)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts(6)}),
                         processing_class=tiny_tokenizer())  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "sft"))
    assert torch.equal(MoTGPTForCausalLM.from_pretrained(tmp_path / "sft").group_fillers, bank())
    lora = LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.up_proj"])
    merged = get_peft_model(MoTGPTForCausalLM.from_pretrained(tmp_path / "sft"), lora).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(MoTGPTForCausalLM.from_pretrained(tmp_path / "merged").group_fillers, bank())


def test_mot_fillers_writes_a_bank_from_text_into_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "ckpt"
    MoTGPTForCausalLM(tiny_config(n_positions=64)).save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    (tmp_path / "notes.txt").write_text(" ".join(texts(60)))
    path = fillers.main([str(checkpoint), "--text", str(tmp_path / "notes.txt"), "--length", "16", "--rows", "4"])
    assert path == checkpoint / FILLER_FILE
    loaded = MoTGPTForCausalLM.from_pretrained(checkpoint).group_fillers
    assert loaded.shape == (4, 16) and not (loaded == 0).any()  # no EOS in a filler
    Dataset.from_dict({"body": [" ".join(texts(30))] * 2}).to_json(tmp_path / "notes.jsonl")  # long documents
    fillers.main([str(checkpoint), "--dataset", "json", "--data_files", str(tmp_path / "notes.jsonl"),
                  "--text_column", "body", "--length", "16"])  # fmt: skip
    assert MoTGPTForCausalLM.from_pretrained(checkpoint).group_fillers.shape == (G - 1, 16)


def test_mot_fillers_refuses_bad_input(tmp_path):
    checkpoint, dense = tmp_path / "ckpt", tmp_path / "dense"
    MoTGPTForCausalLM(tiny_config(n_positions=64)).save_pretrained(checkpoint)
    MoTGPTForCausalLM(tiny_config(mot_layers=[])).save_pretrained(dense)
    for folder in (checkpoint, dense):
        tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "notes.txt").write_text(" ".join(texts(60)))
    text = ["--text", str(tmp_path / "notes.txt"), "--length", "16"]
    with pytest.raises(ValueError, match="needs no filler bank"):
        fillers.main([str(dense), *text])
    with pytest.raises(ValueError, match="`--rows` must be >= group_size - 1 = 2"):
        fillers.main([str(checkpoint), *text, "--rows", "1"])
    with pytest.raises(ValueError, match="does not exist"):
        fillers.main([str(checkpoint), "--text", str(tmp_path / "missing.txt")])
    Dataset.from_dict({"body": texts(6)}).to_json(tmp_path / "notes.jsonl")
    with pytest.raises(ValueError, match="`--text_column` 'text' is not a column"):
        fillers.main([str(checkpoint), "--dataset", "json", "--data_files", str(tmp_path / "notes.jsonl")])
    with pytest.raises(SystemExit):  # argparse: a text source is required
        fillers.main([str(checkpoint)])


def test_an_engine_s_flattened_call_is_refused_with_the_ways_out():
    # vLLM's and SGLang's Transformers backends flatten every request into one row (positions restarting per
    # request) and pass their attention modules as `attention_instances`.
    model = MoTGPTForCausalLM(tiny_config()).eval()
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="vLLM and SGLang.*mot-serve.*mot-transition-tune"):
        model(ids, position_ids=torch.arange(5)[None], attention_instances={0: object()})


def test_the_default_length_and_a_left_padded_row_give_the_lone_prompt_s_answer():
    model = model_with_bank()
    prompt = random_ids(1, 4)
    lone = model.generate(prompt, do_sample=False)  # no length given: generate's default, 20 new tokens
    assert lone.shape == (1, 4 + 20)
    # The same prompt left-padded in a pipeline-like batch whose last group is incomplete: fillers aligned with it.
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), prompt], dim=1)
    batch = torch.cat([random_ids(G, 6, seed=4), padded])
    mask = torch.ones_like(batch)
    mask[G, :2] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out[G, 6:], greedy(model, prompt)[0, 4:], rtol=0, atol=0)


def test_decoding_ends_when_the_prompts_are_done_not_when_their_fillers_are():
    model = model_with_bank()
    prompt = random_ids(1, 4)
    first = greedy(model, prompt)[0, 4].item()  # make the first new token the EOS id
    model.generation_config.eos_token_id = first
    model.set_group_fillers(torch.where(bank() == first, 2 if first != 2 else 3, bank()))  # fillers hold no EOS
    rows = rows_per_forward(model)
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 5) and out[0, 4] == first
    assert len(rows) == 1  # the prompt pass only: no decoding step after every prompt has finished


def test_what_the_bank_cannot_do_falls_back_with_a_warning_and_explicit_fillers_are_refused(caplog):
    model = model_with_bank()
    prompt = random_ids(1, 4)
    with caplog.at_level(logging.WARNING):
        beams = model.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape == (1, 7) and "filler bank was not used: it does not work with `num_beams` > 1" in caplog.text
    with pytest.raises(ValueError, match="`group_fillers`: it does not work with `num_beams` > 1, got 2"):
        model.generate(prompt, max_new_tokens=3, num_beams=2, group_fillers=bank())
    caplog.clear()
    other = model_with_bank()
    with caplog.at_level(logging.WARNING):
        other.generate(inputs_embeds=other.get_input_embeddings()(prompt), max_new_tokens=3, do_sample=False)
    assert "not `inputs_embeds`" in caplog.text
