"""lm-eval with the `motgpt` model: every request of a MoT model scored in a group of its own with filler rows."""

import json
import random
import sys

import lm_eval
import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from mixture_of_tokens import MoTGPTForCausalLM
from mixture_of_tokens.lm_eval_model import TASK_DIR, MoTLM, main, with_task_dir
from mixture_of_tokens.modeling_mot import FILLER_FILE, save_filler_bank
from mixture_of_tokens.tasks import build_task_items

VOCAB = tiny_tokenizer().get_vocab()
WORDS = sorted(word for word in VOCAB if not word.startswith("<"))
GROUP_SIZE = tiny_config().group_size
UNTIL_NEVER = {"until": ["<never>"], "max_gen_toks": 6, "do_sample": False}


def save_checkpoint(folder, with_fillers: bool = True, **overrides):
    """A tiny random model with the tiny tokenizer (the model's vocabulary is the tokenizer's, so that it generates
    words) and, optionally, a filler bank of 64-token rows."""
    torch.manual_seed(0)
    MoTGPTForCausalLM(tiny_config(vocab_size=len(VOCAB), **overrides)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if with_fillers:
        save_filler_bank(filler_bank(64), folder, GROUP_SIZE)
    return folder


def filler_bank(length: int) -> torch.Tensor:
    """`group_size - 1` rows of random word ids (no EOS, no padding)."""
    return torch.randint(3, len(VOCAB), (GROUP_SIZE - 1, length), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def mot_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("mot"))


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def loglikelihood_requests(n: int = 10, seed: int = 0) -> list[Instance]:
    """Contexts of 1 to 30 words with continuations of 1 to 4 words: rows of many lengths in each batch."""
    rng = random.Random(seed)
    return [
        Instance("loglikelihood", {}, (sentence(rng, rng.randint(1, 30)), " " + sentence(rng, rng.randint(1, 4))), i)
        for i in range(n)
    ]


def rolling_requests(n: int = 4, seed: int = 1) -> list[Instance]:
    """Texts of up to 150 words: several 64-token windows each."""
    rng = random.Random(seed)
    return [Instance("loglikelihood_rolling", {}, (sentence(rng, rng.randint(5, 150)),), i) for i in range(n)]


def generate_requests(gen_kwargs: dict, n: int = 4, seed: int = 2) -> list[Instance]:
    rng = random.Random(seed)
    return [Instance("generate_until", {}, (sentence(rng, rng.randint(1, 12)), gen_kwargs), i) for i in range(n)]


def scores(lm, loglikelihood: list[Instance], rolling: list[Instance]) -> list[float]:
    return [s for s, _ in lm.loglikelihood(loglikelihood, disable_tqdm=True)] + lm.loglikelihood_rolling(
        rolling, disable_tqdm=True
    )


def make_lm(folder, batch_size: int, cls=MoTLM, **kwargs):
    return cls(pretrained=str(folder), batch_size=batch_size, device="cpu", **kwargs)


def test_scores_depend_neither_on_batch_size_nor_on_request_order(mot_dir):
    loglikelihood, rolling = loglikelihood_requests(), rolling_requests()
    lm = get_model("motgpt").create_from_arg_string(f"pretrained={mot_dir}", {"batch_size": 1, "device": "cpu"})
    assert isinstance(lm, MoTLM) and lm.group_fillers.shape == (GROUP_SIZE - 1, 64)
    reference = scores(lm, loglikelihood, rolling)
    lm = make_lm(mot_dir, batch_size=4)  # 4 rows of different lengths per forward pass, and a last batch of 2
    assert scores(lm, loglikelihood, rolling) == pytest.approx(reference, rel=1e-5)
    order = random.Random(3).sample(range(len(loglikelihood)), len(loglikelihood))
    shuffled = [score for score, _ in lm.loglikelihood([loglikelihood[i] for i in order], disable_tqdm=True)]
    assert [shuffled[order.index(i)] for i in range(len(order))] == pytest.approx(reference[: len(order)], rel=1e-5)


def test_plain_hf_scores_of_a_mot_model_depend_on_the_batch_size(mot_dir):
    loglikelihood, rolling = loglikelihood_requests(), rolling_requests()
    alone, batched = (scores(make_lm(mot_dir, size, HFLM), loglikelihood, rolling) for size in (1, 4))
    assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) > 1e-3


def test_scores_equal_a_forward_pass_of_the_request_with_the_fillers(mot_dir):
    lm = make_lm(mot_dir, batch_size=4)
    requests = loglikelihood_requests(n=4)
    model = MoTGPTForCausalLM.from_pretrained(mot_dir).eval()
    fillers = json.loads((mot_dir / FILLER_FILE).read_text())["input_ids"]
    for (score, _), request in zip(lm.loglikelihood(requests, disable_tqdm=True), requests, strict=True):
        context, continuation = (lm.tok_encode(text) for text in request.args)
        ids = torch.tensor(context + continuation)[None, :-1]
        group = torch.cat([ids, torch.tensor(fillers)[:, : ids.shape[1]]])
        with torch.no_grad():
            grouped, alone = (model(rows).logits[0].log_softmax(-1) for rows in (group, ids))
        positions = range(len(context) - 1, ids.shape[1])
        expected = sum(grouped[p, t].item() for p, t in zip(positions, continuation, strict=True))
        assert score == pytest.approx(expected, rel=1e-5)
        # The fillers change the score: a request scored alone would get another one.
        assert abs(expected - sum(alone[p, t].item() for p, t in zip(positions, continuation, strict=True))) > 1e-4


def expected_generation(model, lm, context: str, fillers: torch.Tensor, until: list[str]) -> str:
    prompt = torch.tensor([lm.tok_encode(context)])
    output = model.generate(
        prompt, group_fillers=fillers, max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
    )
    text = lm.tok_decode(output[0, prompt.shape[1] :].tolist())
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("batch_size", [1, 3])
def test_generate_until_equals_generate_with_group_fillers(mot_dir, batch_size):
    lm = make_lm(mot_dir, batch_size)
    model = MoTGPTForCausalLM.from_pretrained(mot_dir).eval()
    requests = generate_requests(UNTIL_NEVER)
    full = [expected_generation(model, lm, r.args[0], lm.group_fillers, ["<never>"]) for r in requests]
    assert lm.generate_until(requests, disable_tqdm=True) == full
    # Stopping at the second word generated for some context cuts that text there.
    row = next(i for i, text in enumerate(full) if len(text.split()) > 1)
    stop = full[row].split()[1]
    stopping = generate_requests(UNTIL_NEVER | {"until": [stop]})
    generated = lm.generate_until(stopping, disable_tqdm=True)
    assert generated == [expected_generation(model, lm, r.args[0], lm.group_fillers, [stop]) for r in stopping]
    assert len(generated[row]) < len(full[row])


@pytest.mark.parametrize("overrides", [{"mot_layers": []}, {"ffn_type": "token_choice"}], ids=["dense", "token_choice"])
def test_models_without_groups_are_scored_like_plain_hf(tmp_path, overrides):
    folder = save_checkpoint(tmp_path, **overrides)  # a filler bank in the folder, to be ignored
    ours, plain = make_lm(folder, 3), make_lm(folder, 3, HFLM)
    assert ours.group_fillers is None
    loglikelihood, rolling = loglikelihood_requests(), rolling_requests()
    assert scores(ours, loglikelihood, rolling) == scores(plain, loglikelihood, rolling)
    requests = generate_requests(UNTIL_NEVER)
    assert ours.generate_until(requests, disable_tqdm=True) == plain.generate_until(requests, disable_tqdm=True)


def test_shipped_tasks_load_from_any_directory(mot_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = lm_eval.simple_evaluate(
        model="motgpt",
        model_args=f"pretrained={mot_dir}",
        tasks=["sotu_cloze", "sotu_perplexity"],
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        batch_size=5,
        device="cpu",
        limit=4,
        log_samples=True,
    )
    assert 0 <= results["results"]["sotu_cloze"]["acc,none"] <= 1
    assert results["results"]["sotu_perplexity"]["word_perplexity,none"] > 1
    # Each choice is scored as " " + choice after the context, as a request alone would be.
    samples = results["samples"]["sotu_cloze"]
    requests = [
        Instance("loglikelihood", {}, (sample["doc"]["context"], " " + choice), i)
        for i, sample in enumerate(samples)
        for choice in sample["doc"]["choices"]
    ]
    expected = [score for score, _ in make_lm(mot_dir, 1).loglikelihood(requests, disable_tqdm=True)]
    assert [resp[0][0] for sample in samples for resp in sample["resps"]] == pytest.approx(expected, rel=1e-5)


def test_shipped_task_data_is_what_the_builders_produce():
    for name, items in build_task_items().items():
        lines = (TASK_DIR / name / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == items
        assert 200 <= len(items) <= 500
    cloze = build_task_items()["sotu_cloze"]
    assert all(len(item["choices"]) == 4 and len(set(item["choices"])) == 4 for item in cloze)
    assert {item["label"] for item in cloze} == {0, 1, 2, 3}


@pytest.mark.slow
def test_command_line_runs_a_shipped_task(mot_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mot-lm-eval"])  # `main` sets it for lm-eval's parser; restored after the test
    main(["--model", "motgpt", "--model_args", f"pretrained={mot_dir}", "--tasks", "sotu_perplexity", "--limit", "3",
          "--batch_size", "2", "--device", "cpu", "--output_path", str(tmp_path / "out")])  # fmt: skip
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    perplexity = json.loads(results_file.read_text())["results"]["sotu_perplexity"]["word_perplexity,none"]
    lm = make_lm(mot_dir, 1)
    texts = [json.loads(line)["text"] for line in (TASK_DIR / "sotu_perplexity" / "sotu_perplexity.jsonl").open()]
    nll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts[:3])])
    expected = torch.tensor(-sum(nll) / sum(len(t.split()) for t in texts[:3])).exp().item()
    assert perplexity == pytest.approx(expected, rel=1e-5)


def test_command_line_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mot-lm-eval"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "run" in capsys.readouterr().out


def test_the_shipped_tasks_are_on_the_include_path_unless_the_user_gives_one():
    assert with_task_dir(["--tasks", "sotu_cloze"]) == ["--tasks", "sotu_cloze", "--include_path", str(TASK_DIR)]
    assert with_task_dir(["run", "--include_path=mine"]) == ["run", "--include_path=mine"]
    assert with_task_dir(["run", "--config", "mine.yaml"]) == ["run", "--config", "mine.yaml"]
    assert with_task_dir(["--help"]) == ["--help"]


def test_bad_model_args_are_refused(mot_dir, tmp_path):
    bare = save_checkpoint(tmp_path / "bare", with_fillers=False)
    with pytest.raises(ValueError, match=r"model arg `fillers`.*no filler bank"):
        make_lm(bare, 1)
    with pytest.raises(ValueError, match=r"model arg `fillers`.*no filler bank"):
        make_lm(mot_dir, 1, fillers=str(tmp_path / "missing.json"))
    short = tmp_path / "short"
    short.mkdir()
    save_filler_bank(filler_bank(20), short, GROUP_SIZE)
    with pytest.raises(ValueError, match=r"max_length=64"):
        make_lm(mot_dir, 1, fillers=str(short))
    assert make_lm(mot_dir, 1, fillers=str(short), max_length=20).group_fillers.shape == (GROUP_SIZE - 1, 20)
    dense = save_checkpoint(tmp_path / "dense", with_fillers=False, mot_layers=[])
    with pytest.raises(ValueError, match=r"model arg `fillers` was given"):
        make_lm(dense, 1, fillers=str(mot_dir))
