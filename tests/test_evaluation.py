"""Perplexity through the shipped `evaluate` metric, and the evaluation script end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import random_ids, tiny_config

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.data import load_sotu, train_bpe_tokenizer
from mixture_of_tokens.evaluation import evaluate_perplexity, load_perplexity_metric, main

ROOT = Path(__file__).resolve().parents[1]


def test_metric_module_matches_a_hand_computation():
    metric = load_perplexity_metric()
    metric.add_batch(nll_sums=[3.0, 5.0], token_counts=[2, 2])
    metric.add_batch(nll_sums=[1.5], token_counts=[3])
    result = metric.compute()
    assert result["tokens"] == 7
    assert result["mean_nll"] == pytest.approx(9.5 / 7)
    assert result["perplexity"] == pytest.approx(math.exp(9.5 / 7))


@pytest.mark.parametrize(("overrides", "uses_groups"), [({}, True), ({"ffn_type": "token_choice"}, False),
                                                       ({"mot_layers": []}, False)])  # fmt: skip
def test_only_models_that_mix_rows_need_batches_of_whole_groups(overrides, uses_groups):
    model = MoTGPTForCausalLM(tiny_config(capacity_factor=None, **overrides)).eval()
    assert model.config.uses_groups is uses_groups
    blocks = Dataset.from_dict({"input_ids": random_ids(4, 6).tolist()})
    if uses_groups:
        with pytest.raises(ValueError, match="not a multiple of the model's group_size=3"):
            evaluate_perplexity(model, blocks, batch_size=2)
    else:  # every row on its own: any batch size gives the same result
        assert evaluate_perplexity(model, blocks, batch_size=2)["mean_nll"] == pytest.approx(
            evaluate_perplexity(model, blocks, batch_size=4)["mean_nll"], rel=1e-6
        )


def test_batch_perplexity_equals_the_models_own_loss():
    model = MoTGPTForCausalLM(tiny_config()).eval()
    ids = random_ids(9, 10)
    result = evaluate_perplexity(model, Dataset.from_dict({"input_ids": ids.tolist()}), batch_size=3)
    with torch.no_grad():
        losses = [model(ids[i : i + 3], labels=ids[i : i + 3]).loss for i in range(0, 9, 3)]
    assert result["mean_nll"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


def test_groupings_see_different_groups():
    model = MoTGPTForCausalLM(tiny_config()).eval()
    blocks = Dataset.from_dict({"input_ids": random_ids(6, 10).tolist()})
    fillers = Dataset.from_dict({"input_ids": random_ids(2, 10, seed=3).tolist()})
    results = {g: evaluate_perplexity(model, blocks, 3, g, fillers)["mean_nll"] for g in ("batch", "single", "fillers")}
    assert len(set(results.values())) == 3
    dense = MoTGPTForCausalLM(tiny_config(mot_layers=[])).eval()
    dense_results = [evaluate_perplexity(dense, blocks, 3, g, fillers)["mean_nll"] for g in ("batch", "single")]
    assert dense_results[0] == pytest.approx(dense_results[1], rel=1e-6)
    with pytest.raises(ValueError, match="grouping"):
        evaluate_perplexity(model, blocks, grouping="alone")


@pytest.mark.slow
def test_evaluate_script_writes_results(tmp_path):
    tokenizer = train_bpe_tokenizer(load_sotu()["train"]["text"][:10], vocab_size=300)
    model = MoTGPTForCausalLM(tiny_config(vocab_size=300, n_positions=32, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # `mot-evaluate` (its installed script runs in test_packaging)
    main([str(tmp_path / "model"), "--max_blocks", "6", "--grouping", "batch", "single",
          "--data_cache_dir", str(tmp_path / "cache")])  # fmt: skip
    results = json.loads((tmp_path / "model" / "eval_results.json").read_text())
    for corpus in ("validation", "kjv"):
        for grouping in ("batch", "single"):
            assert results[corpus][grouping]["tokens"] == 6 * 31
            assert 1 < results[corpus][grouping]["perplexity"] < 1000
    assert results["batch_size"] == 3


def test_partial_groups_are_refused_and_groups_of_one_work():
    blocks = Dataset.from_dict({"input_ids": random_ids(4, 10).tolist()})
    with pytest.raises(ValueError, match="not a multiple of the model's group_size=3"):
        evaluate_perplexity(MoTGPTForCausalLM(tiny_config()).eval(), blocks, batch_size=4)
    single = MoTGPTForCausalLM(tiny_config(group_size=1)).eval()
    assert evaluate_perplexity(single, blocks, 1, "fillers", blocks)["tokens"] == 4 * 9


def test_batch_grouping_scores_full_groups_only():
    model = MoTGPTForCausalLM(tiny_config()).eval()  # G 3
    blocks = Dataset.from_dict({"input_ids": random_ids(7, 10).tolist()})
    result = evaluate_perplexity(model, blocks, batch_size=3)
    assert result["tokens"] == 6 * 9  # the seventh block would be a group of one
    other = evaluate_perplexity(model, blocks.select(range(6)), batch_size=6)
    # Batches of 3 and 6 rows hold the same groups but run matmuls of other shapes: equal up to float rounding.
    assert other["tokens"] == result["tokens"]
    assert other["mean_nll"] == pytest.approx(result["mean_nll"], rel=1e-6)
    assert other["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    with pytest.raises(ValueError, match="fewer than one full group"):
        evaluate_perplexity(model, blocks.select(range(2)), batch_size=3)
