"""FSDP on CPU (gloo): 2 processes with per-device batch b train as 1 process with batch 2b while each holds half of
the parameters, gradients and AdamW state; a sharded run saves a whole model and resumes from sharded checkpoints.

The FSDP runs go through the memory benchmark's worker (`benchmarks/memory_sharding.py --worker`): it runs
`run_training(*parse_args(argv))`, exactly what `mot-train` runs, and reports what each process held.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import merge_fsdp_weights
from helpers import free_port, lay_out_hub_cache, run_without_package, tiny_run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mixture_of_tokens.presets import preset_config
from mixture_of_tokens.training import parse_args, run_training

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_sharding  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process

STEPS = ["--max_steps", "4", "--save_steps", "2", "--eval_steps", "4", "--logging_steps", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
# A minimal accelerate config for FSDP2: it names no wrap policy, so the default one-unit-per-block wrapping applies.
ACCELERATE_CONFIG = "distributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\n"
ACCELERATE_CONFIG += "fsdp_config:\n  fsdp_version: 2\n"


def launch(command: list[str]) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]


def measured_run(launcher: list[str], reports: Path, train_args: list[str]) -> list[dict]:
    """Launch the benchmark worker (`mot-train`'s code) in 2 processes; each process's report, by rank."""
    reports.mkdir()
    launch([*launcher, str(ROOT / "benchmarks" / "memory_sharding.py"), "--worker", str(reports), *train_args])
    return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(2)]


def copy_files(source: Path, target: Path, names=("tokenizer.json", "tokenizer_config.json")) -> None:
    target.mkdir()
    for name in names:
        (target / name).write_bytes((source / name).read_bytes())


def losses(run: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in records if "loss" in r or "eval_loss" in r]


def assert_same_weights(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """1 process with batch 16; then 2 FSDP processes with batch 8 (`--fsdp` alone: the default wrapping and
    checkpoints), checkpoints after steps 2 and 4, evaluation after step 4."""
    root = tmp_path_factory.mktemp("fsdp")
    single, fsdp = root / "single", root / "fsdp"
    run_training(*parse_args(tiny_run(corpus, single, *STEPS, "--per_device_train_batch_size", "16")))
    copy_files(single, fsdp)
    launcher = [*TORCHRUN, "--master_port", str(free_port())]
    reports = measured_run(launcher, root / "reports", [*tiny_run(corpus, fsdp, *STEPS), "--fsdp"])
    return {"single": single, "fsdp": fsdp, "reports": reports}


def test_two_fsdp_processes_with_batch_b_follow_one_process_with_batch_2b(runs):
    single, fsdp = runs["single"], runs["fsdp"]
    assert [step for step, _ in losses(single)] == [1, 2, 3, 4, 4]  # 4 training losses, then the evaluation
    torch.testing.assert_close(torch.tensor(losses(fsdp)), torch.tensor(losses(single)), rtol=1e-5, atol=1e-5)
    assert_same_weights(load_file(fsdp / "model.safetensors"), load_file(single / "model.safetensors"))


def test_fsdp_shards_parameters_gradients_and_optimizer_state_per_block(runs):
    shapes = memory_sharding.parameter_shapes(AutoModelForCausalLM.from_pretrained(runs["single"]).config)
    for report in runs["reports"]:
        assert report["fsdp"] and report["world_size"] == 2
        assert report["fsdp_units"]["MoTGPTBlock"] == 1  # the default wrapping: one unit per block (1 block here)
        half = report["full_parameter_bytes"] / 2
        assert report["parameters"] == report["gradients"] == pytest.approx(half, rel=0.01)
        assert report["optimizer_state"] == pytest.approx(2 * half, rel=0.01)  # AdamW's two moments
        total = sum(report[kind] for kind in ("parameters", "gradients", "optimizer_state"))
        assert total == pytest.approx(memory_sharding.fsdp_bytes_per_process(shapes, 2), rel=0.01)
    checkpoint = runs["fsdp"] / "checkpoint-2"
    shards = sorted(path.name for path in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its own
    assert not (checkpoint / "model.safetensors").exists()


LOADER = r"""
import json
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("mot-org/fsdp-mot", trust_remote_code=True).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor(json.loads(sys.argv[1]))).logits.tolist()))
"""


def test_sharded_run_saves_whole_models_that_load_with_and_without_the_package(runs, tmp_path):
    single, fsdp = runs["single"], runs["fsdp"]
    model = AutoModelForCausalLM.from_pretrained(fsdp).eval()
    assert_same_weights(dict(model.state_dict()), dict(AutoModelForCausalLM.from_pretrained(single).state_dict()))
    ids = torch.randint(3, 300, (4, 8))  # one group of 4 rows
    published = tmp_path / "published"  # the output folder's files, without the checkpoints
    copy_files(fsdp, published, [path.name for path in fsdp.iterdir() if path.is_file()])
    lay_out_hub_cache(published, tmp_path / "hub", "mot-org/fsdp-mot")
    logits = json.loads(run_without_package(LOADER, tmp_path / "hub", json.dumps(ids.tolist())).splitlines()[-1])
    with torch.no_grad():  # another process, maybe another thread count: equal up to float32 rounding
        torch.testing.assert_close(torch.tensor(logits), model(ids).logits, rtol=1e-5, atol=1e-5)
    # A sharded checkpoint holds the config and tokenizer; its shards merge into the weights of that step.
    checkpoint, merged_dir = fsdp / "checkpoint-2", tmp_path / "merged"
    merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(merged_dir))
    (merged_dir / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert_same_weights(dict(merged.state_dict()), load_file(single / "checkpoint-2" / "model.safetensors"))


def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(runs, corpus, tmp_path):
    fsdp, resumed = runs["fsdp"], tmp_path / "resumed"
    # Stopped after step 2's checkpoint: the tokenizer, the first two logs and checkpoint-2 remain.
    copy_files(fsdp, resumed)
    (resumed / "metrics.jsonl").write_text("".join((fsdp / "metrics.jsonl").read_text().splitlines(True)[:2]))
    subprocess.run(["cp", "-r", str(fsdp / "checkpoint-2"), str(resumed)], check=True)
    (tmp_path / "fsdp.yaml").write_text(ACCELERATE_CONFIG)
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(tmp_path / "fsdp.yaml"),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]  # fmt: skip
    reports = measured_run(launcher, tmp_path / "reports", [*tiny_run(corpus, resumed, *STEPS), "--resume", "true"])
    assert all(report["fsdp"] and report["fsdp_units"]["MoTGPTBlock"] == 1 for report in reports)
    assert [step for step, _ in losses(resumed)] == [1, 2, 3, 4, 4], "each step logged once"
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(fsdp)), rtol=1e-6, atol=1e-6)
    assert_same_weights(load_file(resumed / "model.safetensors"), load_file(fsdp / "model.safetensors"), 0, 1e-7)


def test_fsdp_defaults_and_the_group_check(corpus, tmp_path):
    args = parse_args(["--fsdp", "--output_dir", str(tmp_path)])[1]
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    # Transformer-based wrapping with no class names: accelerate wraps the model's `_no_split_modules`, MoTGPTBlock.
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "transformer_cls_names_to_wrap" not in plugin
    config = json.dumps({"state_dict_type": "FULL_STATE_DICT"})
    full = parse_args(["--fsdp", "--fsdp_config", config, "--output_dir", str(tmp_path)])[1]
    assert full.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"  # a choice made is kept
    with pytest.raises(ValueError, match="per_device_train_batch_size`=6 is not a multiple of the model's group_size"):
        run_training(*parse_args(tiny_run(corpus, tmp_path, "--fsdp", "--per_device_train_batch_size", "6")))
    assert not (tmp_path / "tokenizer.json").exists()  # refused before any work


def test_communication_volumes_follow_the_derivation_in_the_guide():
    config = preset_config("mot-base", vocab_size=50257, n_positions=256)  # G 32, E 32: one mixture per token
    volume = memory_sharding.communication(config, processes=8)
    tokens_per_device, mot_layers, d, share = 65536 / 8, 6, 768, 7 / 8
    assert volume["expert_parallel_all_to_all_bytes"] == 4 * share * tokens_per_device * 1 * d * 2 * mot_layers
    params = memory_sharding.count(memory_sharding.parameter_shapes(config))
    assert (volume["ddp_bytes"], volume["fsdp_bytes"]) == (2 * share * params * 4, 3 * share * params * 2)
    assert volume["break_even_tokens_per_device"] == 2 * 32 * 3072  # 2 G d_ff / (E / G)
    assert memory_sharding.fsdp_bytes_per_process({"w": (32, 10)}, 64) == 16 * 1 * 10  # one expert row each, padded
