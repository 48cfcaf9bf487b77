"""The tokenizer and tokens stages on a real corpus: the pydoc topics from the standard library."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydoc_data.topics import topics

from lmforge import artifacts
from lmforge.config import TokenizerConfig
from lmforge.errors import LmforgeError
from lmforge.tokenizer import (
    BOS,
    EOS,
    SPECIAL_TOKENS,
    Tokenizer,
    encode_corpus,
    load_tokens,
    read_token_meta,
    train_tokenizer,
)

VOCAB_SIZE = 512

TRICKY_TEXTS = [
    "",
    "plain ASCII text.",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト",
    "combining marks: e\u0301 a\u0308\u0323 \u0915\u094d\u0937",
    "control characters \x00\x01\x1b[31m\x7f\u200b\u2028",
    " " * 100 + "\t" * 7 + "\n" * 12 + "\r\n  end  ",
    "<|eos|>",
    "a document that mentions <|bos|>, <|eos|> and <|pad|> inside <|end|> text",
    "<|user|>hello<|end|><|assistant|>",
    "\ufffd a literal replacement character",
    "\U0010ffff\U000e0001 max code points",
]


def write_data_folder(folder: Path, splits: dict[str, list[str]]) -> Path:
    """A data-stage folder: gzipped JSONL shards per split, then the manifest."""
    folder.mkdir(parents=True)
    for split, texts in splits.items():
        with gzip.open(folder / f"{split}-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
            for index, text in enumerate(texts):
                record = {"id": f"{split}-{index}", "text": text, "source": "pydoc_data.topics", "chars": len(text)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    artifacts.write_manifest(folder, "data", {}, {}, {})
    return folder


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    texts = [topics[key] for key in sorted(topics)]
    return {"train": [t for i, t in enumerate(texts) if i % 10], "val": [t for i, t in enumerate(texts) if not i % 10]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus) -> Path:
    return write_data_folder(tmp_path_factory.mktemp("run") / "data", corpus)


@pytest.fixture(scope="module")
def tokenizer_dir(data_dir) -> Path:
    out_dir = data_dir.parent / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=VOCAB_SIZE), data_dir, out_dir, progress=False)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def tokens_dir(data_dir, tokenizer_dir) -> Path:
    out_dir = data_dir.parent / "tokens"
    encode_corpus(data_dir, tokenizer_dir, out_dir, progress=False)
    return out_dir


def test_special_tokens_have_fixed_first_ids(tokenizer):
    assert SPECIAL_TOKENS == ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    assert [tokenizer.token_id(token) for token in SPECIAL_TOKENS] == list(range(7))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)


def test_vocab_size_is_respected_and_recorded(tokenizer, tokenizer_dir, corpus):
    manifest = artifacts.read_manifest(tokenizer_dir, "tokenizer")
    assert tokenizer.vocab_size == VOCAB_SIZE == manifest["stats"]["vocab_size"]
    assert manifest["stats"]["train_documents"] == len(corpus["train"])
    ids = tokenizer.encode_batch(corpus["val"])
    assert max(max(doc) for doc in ids) < VOCAB_SIZE


def test_tiny_corpus_gives_a_smaller_vocabulary(tmp_path):
    data_dir = write_data_folder(tmp_path / "data", {"train": ["abab abab abab"], "val": ["ab"]})
    manifest = train_tokenizer(TokenizerConfig(vocab_size=4096), data_dir, tmp_path / "tokenizer", progress=False)
    assert 256 + len(SPECIAL_TOKENS) <= manifest["stats"]["vocab_size"] < 4096
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == manifest["stats"]["vocab_size"]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_of_tricky_texts(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


pieces = st.one_of(
    st.text(),
    st.sampled_from(["<|eos|>", "<|bos|>", "<|end|>", " " * 40, "\n\n\n", "\t ", "😀", "中文", "e\u0301", "\x00"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=8).map("".join))
def test_round_trip_of_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert "".join(tokenizer.decode_stream(ids)) == text


def test_special_token_strings_in_text_stay_plain_text(tokenizer):
    ids = tokenizer.encode("before <|eos|> after <|bos|><|pad|>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tokenizer.encode_batch(["<|eos|>"]) == [tokenizer.encode("<|eos|>")]


def test_special_ids_decode_to_their_strings(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "<|bos|>hi<|eos|><|pad|>"


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TRICKY_TEXTS) == [tokenizer.encode(text) for text in TRICKY_TEXTS]


def test_transformers_loads_it_with_the_same_ids(tokenizer, tokenizer_dir, corpus):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in [corpus["val"][0][:2000], "def f(x):\n    return x  # ok", "emoji 😀 and 中文", "  spaces   "]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text), "no BOS/EOS is added by default"
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1, 2)


def test_chat_template_renders_role_tokens(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks!"},
    ]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|><|user|>Thanks!<|end|><|assistant|>"
    assert rendered == expected
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == expected.removesuffix("<|assistant|>")
    hf_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(hf_ids) == tokenizer.encode_chat(messages, add_generation_prompt=True)


def test_unknown_chat_role_is_an_error(tokenizer):
    with pytest.raises(LmforgeError, match="tool"):
        tokenizer.encode_chat([{"role": "tool", "content": "x"}])


def test_incremental_decoding_holds_back_partial_characters(tokenizer):
    text = "Grüße aus Köln 😀👍🏽 — 中文字符 naïve café ∑∫ done"
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(token_id) for token_id in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # The small vocabulary splits these characters across tokens, so holding back was really exercised.
    assert any(tokenizer.token_bytes(token_id).decode("utf-8", errors="ignore") == "" for token_id in ids)
    assert "".join(tokenizer.decode_stream(ids)) == text


def test_save_writes_a_loadable_copy_without_a_manifest(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "checkpoint")
    names = sorted(path.name for path in (tmp_path / "checkpoint").iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    copy = Tokenizer.load(tmp_path / "checkpoint")
    assert copy.encode(TRICKY_TEXTS[2]) == tokenizer.encode(TRICKY_TEXTS[2])


def test_missing_or_corrupt_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="corrupt.*tokenizer.json") as error:
        Tokenizer.load(tmp_path / "broken")
    assert "\n" not in str(error.value)


def test_token_files_reproduce_the_documents(tokenizer, tokens_dir, corpus):
    meta = read_token_meta(tokens_dir)
    assert meta["dtype"] == "uint16"
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (VOCAB_SIZE, 0, 1, 2)
    for split, texts in corpus.items():
        tokens = load_tokens(tokens_dir, split)
        assert tokens.dtype == np.uint16
        counts = meta["splits"][split]
        assert counts == {
            "tokens": len(tokens),
            "documents": len(texts),
            "bytes": sum(len(text.encode("utf-8")) for text in texts),
            "characters": sum(len(text) for text in texts),
        }
        expected = np.concatenate([[tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in texts])
        assert np.array_equal(tokens, expected)
        # Splitting at EOS gives back each document, starting with BOS.
        ends = np.flatnonzero(tokens == tokenizer.eos_id)
        documents = np.split(np.asarray(tokens), ends + 1)[:-1]
        assert [tokenizer.decode(doc) for doc in documents] == [f"{BOS}{text}{EOS}" for text in texts]


def test_tokens_manifest_records_inputs_and_stats(tokens_dir, data_dir, tokenizer_dir):
    manifest = artifacts.read_manifest(tokens_dir, "tokens")
    assert manifest["inputs"] == {
        "data": artifacts.read_manifest(data_dir, "data")["fingerprint"],
        "tokenizer": artifacts.read_manifest(tokenizer_dir, "tokenizer")["fingerprint"],
    }
    meta = read_token_meta(tokens_dir)
    assert manifest["stats"]["train_tokens"] == meta["splits"]["train"]["tokens"]
    assert manifest["stats"]["tokens_per_second"] > 0


def test_empty_split_is_a_clear_error(tmp_path, tokenizer_dir):
    data_dir = write_data_folder(tmp_path / "data", {"train": ["some text"], "val": []})
    with pytest.raises(LmforgeError, match="val split"):
        encode_corpus(data_dir, tokenizer_dir, tmp_path / "tokens", progress=False)


def test_missing_or_incomplete_tokens_are_clear_errors(tmp_path, tokens_dir):
    with pytest.raises(LmforgeError, match="no tokens artifact"):
        load_tokens(tmp_path / "nowhere", "train")
    (tmp_path / "interrupted").mkdir()
    with pytest.raises(LmforgeError, match="incomplete"):
        read_token_meta(tmp_path / "interrupted")
    with pytest.raises(LmforgeError, match="no 'test' split"):
        load_tokens(tokens_dir, "test")


def test_truncated_token_file_is_a_clear_error(tmp_path, tokens_dir):
    import shutil

    copy = Path(shutil.copytree(tokens_dir, tmp_path / "tokens"))
    with open(copy / "val.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(LmforgeError, match="val.bin is 10 bytes"):
        load_tokens(copy, "val")
