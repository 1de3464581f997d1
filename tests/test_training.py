"""Training and fine-tuning scripts on tiny models and a small slice of the bundled corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import console_script, free_port, tiny_run
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.presets import preset_config
from mixture_of_tokens.trainer import MoTTrainer
from mixture_of_tokens.training import check_groups, finetune_main, parse_args, run_training

ROOT = Path(__file__).resolve().parents[1]


def test_short_run_lowers_the_loss_and_writes_its_outputs(corpus, tmp_path):
    run_training(
        *parse_args(tiny_run(corpus, tmp_path, "--max_steps", "16", "--eval_steps", "8", "--learning_rate", "3e-3"))
    )
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert losses[-1] < losses[0] - 0.5 and len(evals) == 2 and evals[1] < evals[0]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "loss_curves.png", "modeling_mot.py"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "checkpoint-16" / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.group_size == 4 and model.config.vocab_size == 300


@pytest.mark.slow
def test_torch_compile_trains_like_eager(corpus, tmp_path):
    """`mot-train --torch_compile` (Trainer's flag) trains the compiled model: its losses follow the eager run's
    within float32 rounding (inductor's kernels sum in another order), and the saved weights load into an eager
    model."""
    steps = ("--max_steps", "6", "--eval_strategy", "no", "--save_strategy", "no", "--learning_rate", "3e-3")
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--torch_compile", "true"))):
        counters.clear()
        run_training(*parse_args(tiny_run(corpus, tmp_path / name, *steps, *extra)))
        assert (counters["stats"]["unique_graphs"] > 0) == (name == "compiled")
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = [m["loss"] for m in map(json.loads, lines) if "loss" in m]
    assert len(runs["compiled"]) == len(runs["eager"]) >= 3
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-3, atol=1e-3)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "compiled"), MoTGPTForCausalLM)


def test_resumed_run_equals_an_uninterrupted_one(corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "100"]
    run_training(*parse_args(tiny_run(corpus, straight, *steps)))
    # Stopped after step 8 had been logged but before its checkpoint: the tokenizer, the logs and checkpoint-4 remain.
    resumed.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "metrics.jsonl"):
        (resumed / name).write_bytes((straight / name).read_bytes())
    subprocess.run(["cp", "-r", str(straight / "checkpoint-4"), str(resumed)], check=True)
    run_training(*parse_args(tiny_run(corpus, resumed, *steps, "--resume", "true")))
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in (straight, resumed)]  # fmt: skip
    assert [step for step, _ in losses[1]] == [2, 4, 6, 8], "each step logged once"
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)


def test_learned_temperatures_and_expert_biases_get_no_weight_decay():
    config = preset_config("mot-tiny", n_layer=1, learnable_temperature="expert", expert_bias=True)
    model = MoTGPTForCausalLM(config)
    trainer = MoTTrainer(model=model, args=parse_args(["--output_dir", "unused", "--eval_strategy", "no"])[1])
    decayed = trainer.get_decay_parameter_names(model)
    expert_weights = ("router.weight", "experts.up_proj", "experts.down_proj")
    assert {f"transformer.h.0.mlp.{name}" for name in expert_weights} <= set(decayed)
    assert not [name for name in decayed if name.endswith(("log_temperature", "up_proj_bias", "down_proj_bias"))]


def test_existing_checkpoints_need_resume(corpus, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match="--resume"):
        run_training(*parse_args(tiny_run(corpus, tmp_path)))


def test_bad_preset_is_refused():
    with pytest.raises(ValueError, match="`preset` must be one of"):
        preset_config("mot-huge")


def test_batch_without_full_groups_is_refused_before_training(corpus, tmp_path):
    with pytest.raises(
        ValueError, match="per_device_train_batch_size`=6 is not a multiple of the model's group_size=4"
    ):
        run_training(*parse_args(tiny_run(corpus, tmp_path, "--per_device_train_batch_size", "6")))
    assert not (tmp_path / "tokenizer.json").exists()
    check_groups(preset_config("dense-tiny"), 6, 6)  # a dense twin has no groups to fill


def test_config_file_sets_arguments_and_the_command_line_wins(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "preset: dense-small\nlearning_rate: 0.001\nmax_steps: 7\nmodel:\n  n_layer: 2\n  mot_layers: [1]\n"
    )
    script, args = parse_args(["--config_file", str(tmp_path / "run.yaml"), "--max_steps", "9"])
    assert (script.preset, args.learning_rate, args.max_steps) == ("dense-small", 0.001, 9)
    assert sorted(script.model) == ["mot_layers=[1]", "n_layer=2"]
    assert (args.max_grad_norm, args.weight_decay, args.lr_scheduler_type.value) == (0.5, 0.1, "cosine_with_min_lr")


def test_config_file_with_an_unknown_argument_is_refused_naming_it(tmp_path):
    (tmp_path / "run.json").write_text('{"max_steps": 7, "learning_rat": 0.001}')
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args(["--config_file", str(tmp_path / "run.json")])


def test_presets_use_the_experts_activation_in_dense_mlps():
    for preset in ("dense-tiny", "mot-medium"):
        assert preset_config(preset).activation_function == preset_config(preset).expert_activation == "relu"


def test_finetune_script_tunes_a_non_mot_checkpoint_on_a_text_file(corpus, tmp_path):
    from mixture_of_tokens.data import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([Path(corpus["train"]).read_text()], vocab_size=300)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    finetune_main([  # `mot-finetune` (its installed script answers --help in test_packaging)
        "--model_name_or_path", str(tmp_path / "base"),
        "--corpus", corpus["train"], "--validation", corpus["valid"], "--block_size", "32",
        "--data_cache_dir", corpus["cache"], "--output_dir", str(tmp_path / "tuned"), "--max_steps", "6",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--eval_steps", "6",
        "--max_eval_blocks", "8", "--disable_tqdm", "true",
    ])  # fmt: skip
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert isinstance(tuned, GPT2LMHeadModel)
    assert not torch.equal(tuned.transformer.h[0].mlp.c_fc.weight, gpt2.transformer.h[0].mlp.c_fc.weight)


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(port)],
    "accelerate": lambda port: [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
                                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                                "--main_process_port", str(port)],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_with_batch_b_follow_one_process_with_batch_2b(corpus, tmp_path, launcher):
    steps = ["--max_steps", "4", "--eval_steps", "100", "--save_steps", "100", "--logging_steps", "1"]
    single, double = tmp_path / "single", tmp_path / "double"
    run_training(*parse_args(tiny_run(corpus, single, *steps, "--per_device_train_batch_size", "16")))
    double.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (double / name).write_bytes((single / name).read_bytes())
    script = [console_script("mot-train"), *tiny_run(corpus, double, *steps)]  # per-device batch 8, G 4
    subprocess.run(
        LAUNCHERS[launcher](free_port()) + script,
        check=True,
        capture_output=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    losses = [[m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
              for run in (single, double)]  # fmt: skip
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    expected, actual = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
