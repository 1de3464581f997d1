"""TRL's `SFTTrainer` on tiny MoTGPT models: padding, wrapped packing, resuming, the group rule and the aux loss."""

import random

import pytest
import torch
from datasets import Dataset
from helpers import WORDS, tiny_config, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

from mixture_of_tokens import MoTGPTForCausalLM


def texts(n: int, seed: int = 0) -> list[str]:
    """`n` sentences of 4 to 12 words over a small vocabulary, so that a few steps visibly lower the loss."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:6]) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def sft(model, dataset, output_dir, **overrides) -> SFTTrainer:
    args = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=6,  # two groups of group_size=3
        learning_rate=3e-3,
        max_length=16,  # within the tiny model's n_positions
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return SFTTrainer(
        model=model, args=SFTConfig(**(args | overrides)), train_dataset=dataset, processing_class=tiny_tokenizer()
    )


def losses(trainer: SFTTrainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def record_batch_rows(model) -> list[int]:
    """The number of rows of every batch the backbone (which TRL's fused forward calls directly) sees."""
    rows = []
    model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


@pytest.mark.parametrize("packing", [None, "wrapped"])
def test_mot_trains_on_text_with_padding_or_wrapped_packing_without_aux_loss(tmp_path, packing):
    packing_args = {} if packing is None else {"packing": True, "packing_strategy": packing}
    trainer = sft(MoTGPTForCausalLM(tiny_config()), Dataset.from_dict({"text": texts(24)}), tmp_path, **packing_args)
    batch = next(iter(trainer.get_train_dataloader()))
    # One sequence (or, wrapped, one fixed-length slice of the token stream) per row, with the 2-D mask MoT needs.
    assert batch["input_ids"].shape[0] == 6 and batch["attention_mask"].ndim == 2 and "position_ids" not in batch
    if packing is None:
        assert not batch["attention_mask"].all()  # real padding, kept out of the mixtures
    else:
        # Wrapped packing cuts the token stream into rows of max_length; only the stream's last row is shorter.
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        assert batch["input_ids"].shape[1] == 16 and set(lengths[:-1]) == {16} and lengths[-1] <= 16
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0] - 0.2
    # MoT is balanced by construction: TRL must add no load-balancing loss and ask for no router logits.
    assert not trainer.aux_loss_enabled and not trainer.model.config.output_router_logits
    assert not any("aux_loss" in log for log in trainer.state.log_history)


def test_prompt_completion_dataset_trains_on_the_completions(tmp_path):
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(2, 6))) for _ in range(24)]
    dataset = Dataset.from_dict({"prompt": prompts, "completion": [" people nation"] * 24})
    trainer = sft(MoTGPTForCausalLM(tiny_config()), dataset, tmp_path, max_steps=8, learning_rate=1e-2)
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = tiny_tokenizer()
    completion = tokenizer.convert_tokens_to_ids(["people", "nation"]) + [tokenizer.eos_token_id]
    for labels in batch["labels"]:
        assert labels[labels != -100].tolist() == completion  # the prompt is context only
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0] - 1.0


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    dataset = Dataset.from_dict({"text": texts(24)})

    def trainer(output_dir):
        torch.manual_seed(0)
        return sft(
            MoTGPTForCausalLM(tiny_config()), dataset, output_dir, max_steps=4, save_strategy="steps", save_steps=2
        )

    straight = trainer(tmp_path / "straight")
    straight.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and losses(resumed)[-2:] == losses(straight)[-2:]
    for (name, weight), resumed_weight in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        torch.testing.assert_close(resumed_weight, weight, msg=name)


@pytest.mark.parametrize(
    "args, message",
    [
        # Default (bfd) packing is always padding-free: the whole batch becomes one row of packed sequences.
        ({"packing": True}, "packing_strategy='wrapped'"),
        ({"per_device_train_batch_size": 2}, "per_device_train_batch_size"),
    ],
    ids=["padding_free_packing", "batch_smaller_than_a_group"],
)
def test_batches_without_whole_groups_are_refused_at_the_first_step(tmp_path, args, message):
    model = MoTGPTForCausalLM(tiny_config())
    before = {name: weight.clone() for name, weight in model.named_parameters()}
    trainer = sft(model, Dataset.from_dict({"text": texts(24)}), tmp_path, **args)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(weight, before[name]) for name, weight in model.named_parameters())


@pytest.mark.parametrize("overrides", [{"mot_layers": []}, {"ffn_type": "token_choice"}], ids=["dense", "token_choice"])
def test_models_without_groups_train_with_padding_free_packing(tmp_path, overrides):
    model = MoTGPTForCausalLM(tiny_config(**overrides))
    rows = record_batch_rows(model)
    trainer = sft(model, Dataset.from_dict({"text": texts(24)}), tmp_path, packing=True)
    trainer.train()
    assert set(rows) == {1}  # every batch was packed into one row
    assert losses(trainer)[-1] < losses(trainer)[0] - 0.2
    assert trainer.aux_loss_enabled == (overrides.get("ffn_type") == "token_choice")


def switch_loss(router_logits: list[torch.Tensor], mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss from per-layer `(batch, seq, E)` logits, averaged over the real tokens."""
    probs = torch.stack(router_logits).softmax(dim=-1)  # (layers, batch, seq, E)
    chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).float()
    real = mask.bool().expand(probs.shape[:3])
    tokens_per_expert = chosen[real].mean(dim=0)  # (top_k, E)
    return probs.shape[-1] * (tokens_per_expert * probs[real].mean(dim=0)).sum()


def test_token_choice_aux_loss_is_added_by_trl_and_equals_the_models_own(tmp_path):
    model = MoTGPTForCausalLM(tiny_config(ffn_type="token_choice", num_experts_per_tok=2))
    trainer = sft(model, Dataset.from_dict({"text": texts(24)}), tmp_path)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01
    batch = next(iter(trainer.get_train_dataloader()))
    assert not batch["attention_mask"].all()  # padding must be left out of the balance, in the right rows
    layer_inputs = []
    for block in model.transformer.h:
        block.mlp.register_forward_pre_hook(lambda module, args: layer_inputs.append((module, args[0])))
    model.train()
    trl_loss = trainer.compute_loss(model, dict(batch))
    trl_aux = trainer._metrics["train"]["aux_loss"][-1]
    # By hand, from each layer's router logits (batch, seq, E), to catch a wrong order of the flattened logits.
    expected = switch_loss([h @ layer.router.weight for layer, h in layer_inputs], batch["attention_mask"], 2)
    own = model(**batch, output_router_logits=True)  # the model's own forward: cross-entropy + 0.01 * aux
    assert trl_aux == pytest.approx(expected.item(), rel=1e-5)
    assert own.aux_loss.item() == pytest.approx(trl_aux, rel=1e-5)
    torch.testing.assert_close(trl_loss, own.loss)


@pytest.mark.parametrize("drop_last", [False, True])
def test_partial_last_batch_of_an_epoch(tmp_path, drop_last):
    # 8 examples in batches of 6: the last batch holds 2 rows, fewer than group_size=3, past the first-step check.
    model = MoTGPTForCausalLM(tiny_config())
    rows = record_batch_rows(model)
    trainer = sft(
        model, Dataset.from_dict({"text": texts(8)}), tmp_path, max_steps=-1, num_train_epochs=1,
        dataloader_drop_last=drop_last,
    )  # fmt: skip
    trainer.train()
    assert rows == ([6] if drop_last else [6, 2]) and trainer.state.global_step == len(rows)
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


def test_a_load_balancing_loss_for_mot_is_refused(tmp_path):
    dataset = Dataset.from_dict({"text": texts(6)})
    # SFTTrainer writes the coefficient into the built config; the model refuses it at the first forward pass.
    trainer = sft(MoTGPTForCausalLM(tiny_config()), dataset, tmp_path, router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        trainer.train()
