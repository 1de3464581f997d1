"""PyTorch 2's fast paths: fullgraph `torch.compile` of static-cache decoding, Token Choice compiled, `torch.export`.

Compiling is slow on small CPUs (a cold inductor compile of a one-block model takes 10-20 s), so the models are one
block of width 16 and every test compiles once."""

import pytest
import torch
from helpers import random_ids, tiny_config
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM, export_with_dynamic_cache

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.modeling_mot import TokenChoiceLayer

pytestmark = pytest.mark.slow

# The three kinds of model a user compiles: MoT (groups of 3 rows), its dense twin, dropless Token Choice (top-2).
KINDS = {
    "mot": {},
    "dense": {"mot_layers": []},
    "token_choice": {"ffn_type": "token_choice", "num_experts_per_tok": 2, "capacity_factor": None},
}


def one_block_model(kind: str) -> MoTGPTForCausalLM:
    return MoTGPTForCausalLM(tiny_config(n_layer=1, n_embd=16, n_head=2, **KINDS[kind])).eval()


def left_padded_prompts(batch_size: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(batch_size, length, seed=seed)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # the last row is two tokens shorter
    return ids, mask


def an_early_token(model: MoTGPTForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """A token that greedy decoding of `ids` emits among its first new tokens and that the model's filler bank does
    not hold: used as EOS, it ends a row early."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=None)
    bank = model.group_fillers
    return next(t for t in out[:, ids.shape[1] + 1 : -3].flatten().tolist() if bank is None or t not in bank)


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_decoding_compiles_once_and_gives_the_eager_tokens(kind):
    """`generate` with a static cache compiles the forward with `fullgraph=True` once: later steps and a second call
    with other prompts of the same shape reuse it (a recompile raises), and the greedy tokens equal eager decoding's.
    The MoT model gets two prompts, each completed into a group of 3 by its filler bank. EOS is a token the first
    prompts emit early, so rows finish while others decode (a finished row leaves its group's mixtures)."""
    model = one_block_model(kind)
    if kind == "mot":
        model.set_group_fillers(random_ids(4, 40, seed=9) % 47 + 50)  # ids 50-96: room for an EOS outside
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told
    ids, mask = left_padded_prompts(2, 6, seed=0)
    eos = an_early_token(model, ids, mask)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=eos)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1):
            ids, mask = left_padded_prompts(2, 6, seed)
            eager = model.generate(ids, attention_mask=mask, **settings)
            compiled = model.generate(
                ids, attention_mask=mask, cache_implementation="static", compile_config=compile_config, **settings
            )
            assert torch.equal(compiled, eager)
            if seed == 0:
                assert (eager[:, 6:-1] == eos).any()  # a row finished before the last step
    assert counters["stats"]["unique_graphs"] == 1
    assert hasattr(model, "_compiled_call")  # the decoding steps did run compiled


def test_token_choice_with_widths_the_grouped_kernel_refuses_compiles_in_bfloat16():
    """bfloat16 experts whose rows are not multiples of 16 bytes (d 20): eager takes the loop over experts, traced
    code transformers' batched_mm forward; both give the same update (bfloat16 rounding)."""
    config = tiny_config(n_embd=20, n_head=2, ffn_type="token_choice", num_experts_per_tok=2, capacity_factor=None,
                         experts_implementation="grouped_mm")  # fmt: skip
    layer = TokenChoiceLayer(config).to(torch.bfloat16)
    for weight in layer.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    x = torch.randn(3, 4, 20, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=2e-2, atol=2e-2)


def test_token_choice_compiles_fullgraph_in_float32_with_the_eager_outputs_and_gradients():
    """Dropless top-2 Token Choice under `torch.compile(fullgraph=True)` (inductor), float32, with padding: no
    data-dependent shape breaks the graph, and outputs and gradients equal the eager layer's."""
    config = tiny_config(
        ffn_type="token_choice", num_experts_per_tok=2, capacity_factor=None, experts_implementation="grouped_mm"
    )
    layer = TokenChoiceLayer(config)
    for weight in layer.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    x = torch.randn(4, 5, 32)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[0, :3] = 0

    def output_and_grads(forward) -> list[torch.Tensor]:
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        out = forward(inputs, token_mask=mask)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        return [out, inputs.grad, layer.router.weight.grad, layer.experts.up_proj.grad, layer.experts.down_proj.grad]

    eager = output_and_grads(layer)
    compiled = output_and_grads(torch.compile(layer, fullgraph=True))
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # kernels differ: float32 rounding


@pytest.mark.parametrize("kind", KINDS)
def test_forward_exports_with_the_eager_logits(kind):
    """`torch.export` of the forward with a padded 2-D mask and explicit position ids (the packing check, which reads
    them, stays out of the traced program), run on other inputs of the same shape."""
    model = one_block_model(kind)
    ids, mask = left_padded_prompts(3, 6, seed=0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
    program = torch.export.export(model, (), inputs, strict=False)
    inputs["input_ids"] = random_ids(3, 6, seed=1)
    torch.testing.assert_close(program.module()(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_exports_with_dynamic_and_static_caches(kind):
    """Generation exported two ways: a prompt pass with a `DynamicCache` (transformers' `export_with_dynamic_cache`)
    and static-cache decoding (transformers' ExecuTorch recipe, one token of every row per call). Greedy decoding
    through the exported static-cache program gives `generate`'s tokens for a batch of one full MoT group."""
    model = one_block_model(kind)
    ids = random_ids(3, 5, seed=2)
    program = export_with_dynamic_cache(model, ids, torch.ones_like(ids))
    cache = DynamicCache(config=model.config)
    cache_logits = program.module()(
        input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True
    ).logits
    torch.testing.assert_close(cache_logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    model.generation_config.cache_implementation = "static"
    new_tokens = 6
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=3, max_cache_len=ids.shape[1] + new_tokens)
    step = exportable.export(input_ids=ids[:, :1], cache_position=torch.tensor([0])).module()
    tokens = ids
    for position in range(ids.shape[1] + new_tokens - 1):
        logits = step(input_ids=tokens[:, position : position + 1], cache_position=torch.tensor([position]))
        if position >= ids.shape[1] - 1:
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(tokens, expected)


def test_compiled_training_still_refuses_packed_rows():
    """The packing check leaves only traced inference: a model compiled for training (as `Trainer`'s
    `torch_compile` does, without `fullgraph`) still refuses sequences packed into one row."""
    model = MoTGPTForCausalLM(tiny_config(n_layer=1, n_embd=16, n_head=2)).train()
    compiled = torch.compile(model, backend="eager")
    ids = random_ids(3, 8)
    packed = torch.cat([torch.arange(3), torch.arange(5)]).expand(3, -1)
    with pytest.raises(ValueError, match="packed into one row"):
        compiled(input_ids=ids, position_ids=packed, labels=ids)
    assert torch.isfinite(compiled(input_ids=ids, labels=ids).loss)
