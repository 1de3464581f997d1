"""PEFT LoRA on tiny MoTGPT models: on GPT-2's Conv1D attention, on the 3-D expert weights, and merged back."""

import random

import pytest
import torch
from datasets import Dataset
from helpers import WORDS, random_ids, tiny_config, tiny_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from trl import SFTConfig, SFTTrainer

from mixture_of_tokens import MoTGPTForCausalLM


def attention_lora() -> LoraConfig:
    # GPT-2's c_attn is a Conv1D, whose weight is stored (in, out): LoRA must be told so.
    return LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)


def experts_lora() -> LoraConfig:
    # The stacked expert weights (n_experts, in, out) are parameters, not modules: PEFT matches them by name suffix.
    return LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.up_proj", "mlp.experts.down_proj"])


ADAPTED = {"attention": ("attn.c_attn.weight",), "experts": ("mlp.experts.up_proj", "mlp.experts.down_proj")}
LORAS = {"attention": attention_lora, "experts": experts_lora}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved base checkpoint: block 0 dense, block 1 MoT, so that only block 1 has experts to adapt."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    MoTGPTForCausalLM(tiny_config(mot_layers=[1])).save_pretrained(folder)
    return folder


def train_a_few_steps(model, steps: int = 4) -> list[float]:
    ids = random_ids(6, 12)  # two groups of group_size=3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=random_ids(6, 12, seed=1)).logits


def changed_weights(model, base_dir) -> list[str]:
    base = MoTGPTForCausalLM.from_pretrained(base_dir).state_dict()
    state = model.state_dict()
    assert state.keys() == base.keys()  # a plain MoTGPT again: no LoRA layers or parametrizations left
    return sorted(name for name in state if not torch.equal(state[name], base[name]))


@pytest.mark.parametrize("target", ["attention", "experts"])
def test_lora_trains_saves_reloads_and_merges(base_dir, tmp_path, target):
    model = get_peft_model(MoTGPTForCausalLM.from_pretrained(base_dir), LORAS[target]())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    losses = train_a_few_steps(model)
    assert losses[-1] < losses[0]
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(MoTGPTForCausalLM.from_pretrained(base_dir)), atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(MoTGPTForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), adapted)
    merged = reloaded.merge_and_unload()
    assert type(merged) is MoTGPTForCausalLM
    torch.testing.assert_close(logits(merged), adapted)
    expected = {
        "attention": ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"],
        "experts": ["transformer.h.1.mlp.experts.down_proj", "transformer.h.1.mlp.experts.up_proj"],
    }[target]
    assert changed_weights(merged, base_dir) == expected

    merged.save_pretrained(tmp_path / "merged")  # a plain checkpoint, loaded without PEFT
    torch.testing.assert_close(logits(MoTGPTForCausalLM.from_pretrained(tmp_path / "merged")), adapted)


def test_attention_and_experts_need_two_adapters(base_dir, tmp_path):
    # One LoraConfig cannot hold both: PEFT's parameter wrapper refuses Conv1D's fan_in_fan_out.
    both = LoraConfig(
        r=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        target_parameters=["mlp.experts.up_proj", "mlp.experts.down_proj"],
    )
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        get_peft_model(MoTGPTForCausalLM.from_pretrained(base_dir), both)
    # Two adapters on one model, both active, train together, and save into one folder (the second in a subfolder).
    model = get_peft_model(MoTGPTForCausalLM.from_pretrained(base_dir), attention_lora())
    model.add_adapter("experts", experts_lora())
    model.base_model.set_adapter(["default", "experts"])
    train_a_few_steps(model)
    adapted = logits(model)
    model.save_pretrained(tmp_path / "adapters")

    reloaded = PeftModel.from_pretrained(MoTGPTForCausalLM.from_pretrained(base_dir), tmp_path / "adapters")
    reloaded.load_adapter(tmp_path / "adapters" / "experts", adapter_name="experts")
    reloaded.base_model.set_adapter(["default", "experts"])
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted)
    assert changed_weights(merged, base_dir) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.mlp.experts.down_proj",
        "transformer.h.1.mlp.experts.up_proj",
    ]


@pytest.mark.parametrize("target", ["attention", "experts"])
def test_sft_trainer_with_a_peft_config(base_dir, tmp_path, target):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS[:6]) for _ in range(rng.randint(4, 12))) for _ in range(12)]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=6,
        learning_rate=1e-2,
        max_length=16,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=MoTGPTForCausalLM.from_pretrained(base_dir),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tiny_tokenizer(),
        peft_config=LORAS[target](),
    )
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    # Training reached exactly the adapted weights; every other weight stayed frozen.
    assert {name.split(".", 3)[-1] for name in changed_weights(merged, base_dir)} == set(ADAPTED[target])
