"""The publish script's dry run: the folder, its card, and loading it from an offline Hub cache as a user would."""

import json
from pathlib import Path

import pytest
import torch
from helpers import lay_out_hub_cache, run_without_package, tiny_config
from huggingface_hub import ModelCard

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.data import load_sotu, train_bpe_tokenizer
from mixture_of_tokens.publish import main as publish_main

ROOT = Path(__file__).resolve().parents[1]
EVAL_RESULTS = {
    "validation": {"batch": {"perplexity": 123.4567, "mean_nll": 4.8159, "tokens": 3968}},
    "kjv": {"batch": {"perplexity": 234.5678, "mean_nll": 5.4577, "tokens": 3968}},
}
PROMPTS = ["The state of the Union is", "Our economy", "We must"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    tokenizer = train_bpe_tokenizer(load_sotu()["train"]["text"][:5], vocab_size=300)
    config = tiny_config(vocab_size=300, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    MoTGPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    return folder


@pytest.fixture(scope="module")
def release(checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("release") / "tiny-mot"
    publish_main([str(checkpoint), "--dry-run", str(folder)])  # `mot-publish` (its installed script: test_packaging)
    return folder


def test_dry_run_writes_exactly_the_release_files(release):
    assert sorted(p.name for p in release.iterdir()) == [
        "README.md",
        "config.json",
        "configuration_mot.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_mot.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((release / "generation_config.json").read_text())["pad_token_id"] == 0
    assert set(json.loads((release / "config.json").read_text())["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
    }


def test_card_parses_and_carries_the_evaluation_results(release):
    card = ModelCard.load(release / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "mixture-of-tokens" in card.data.tags and card.data.license == "apache-2.0"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("sotu", "perplexity"): 123.4567, ("kjv", "perplexity"): 234.5678}
    for text in ("trust_remote_code=True", "group_fillers", "router_temperature=0", "@inproceedings{antoniak2024"):
        assert text in card.text


LOADER = r"""
import json
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

prompts = json.loads(sys.argv[1])
repo = "mot-org/tiny-mot"
config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
base = AutoModel.from_pretrained(repo, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
batch = tokenizer(prompts, return_tensors="pt", padding=True)
tokens = model.generate(**batch, max_new_tokens=6, do_sample=False).tolist()
generator = pipeline("text-generation", model=repo, trust_remote_code=True)
texts = [o[0]["generated_text"] for o in generator(prompts, max_new_tokens=6, do_sample=False, batch_size=3)]
print(json.dumps({"classes": [type(o).__name__ for o in (config, base, model)], "tokens": tokens, "texts": texts,
                  "imported": sorted(m for m in sys.modules if m.startswith("mixture_of_tokens"))}))
"""


@pytest.mark.slow
def test_release_loads_offline_without_the_package_and_generates_the_same(release, tmp_path):
    lay_out_hub_cache(release, tmp_path / "hub", "mot-org/tiny-mot")
    loaded = json.loads(run_without_package(LOADER, tmp_path / "hub", json.dumps(PROMPTS)).strip().splitlines()[-1])
    assert loaded["classes"] == ["MoTGPTConfig", "MoTGPTModel", "MoTGPTForCausalLM"]
    assert loaded["imported"] == []
    from transformers import AutoTokenizer, pipeline

    model = MoTGPTForCausalLM.from_pretrained(release)
    tokenizer = AutoTokenizer.from_pretrained(release)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert loaded["tokens"] == model.generate(**batch, max_new_tokens=6, do_sample=False).tolist()
    local = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        PROMPTS, max_new_tokens=6, do_sample=False, batch_size=3
    )
    assert loaded["texts"] == [o[0]["generated_text"] for o in local]


def test_non_safetensors_checkpoint_is_refused(checkpoint, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in checkpoint.iterdir():
        if file.name != "model.safetensors":
            (legacy / file.name).write_bytes(file.read_bytes())
    torch.save({}, legacy / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights"):
        publish_main([str(legacy), "--dry-run", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_evaluation_results_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no evaluation results"):
        publish_main(
            [str(checkpoint), "--dry-run", str(tmp_path / "out"), "--eval-results", str(tmp_path / "none.json")]
        )
