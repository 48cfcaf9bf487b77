"""Decontamination: hashed word n-grams of evaluation text, matched against training documents."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmforge.data.decontaminate import (MAX_CHUNK, MIN_SHORT_WORDS, NGramIndex, build_index, gram_hashes, word_hashes,
                                        words_of)
from lmforge.errors import LmforgeError

EVAL_PASSAGE = (
    "The mitochondria of a cell convert nutrients into adenosine triphosphate, which powers most of the chemical "
    "reactions that keep the cell alive, and they carry their own small circular genome."
)
OTHER_PASSAGE = (
    "Glaciers carve wide valleys with a U-shaped profile, leaving behind moraines, erratic boulders and long lakes "
    "that fill the basins once the ice has retreated toward the mountains."
)
TRAINING_FILLER = "A training document talks about many things, such as gardens, ships and the price of bread. "


def reference_grams(texts: list[str], n: int) -> set[tuple[str, ...]]:
    """The distinct n-grams (and whole short texts) the index should hold, computed plainly."""
    grams = set()
    for text in texts:
        words = tuple(words_of(text))
        if len(words) >= n:
            grams.update(words[i:i + n] for i in range(len(words) - n + 1))
        elif len(words) >= min(MIN_SHORT_WORDS, n):
            grams.add(words)
    return grams


def test_words_fold_case_punctuation_and_unicode():
    assert words_of("Hello,  WORLD!\tsnake_case—em-dash «Grüße» ÉCOLE 3.14") == [
        "hello", "world", "snake", "case", "em", "dash", "grüße", "école", "3", "14"]
    assert (word_hashes("Grüße, ÉCOLE!") == word_hashes("grüße école")).all()
    assert len(set(word_hashes("a b ab ba aa abc cab").tolist())) == 7


def test_gram_hashes_agree_with_the_polynomial_they_stand_for():
    words = word_hashes(EVAL_PASSAGE)
    base, n = 0x9E3779B97F4A7C15, 5
    expected = [sum(int(words[i + j]) * pow(base, j, 1 << 64) for j in range(n)) % (1 << 64)
                for i in range(len(words) - n + 1)]
    assert gram_hashes(words, n).tolist() == expected
    assert len(gram_hashes(words[:4], 5)) == 0


def test_huge_texts_are_hashed_in_pieces_with_the_same_result():
    lines = [f"line {i} of a long evaluation file, with words that repeat" for i in range(40_000)]
    text = "\n".join(lines)
    assert len(text) > 2 * MAX_CHUNK
    assert (word_hashes(text) == np.concatenate([word_hashes(line) for line in lines])).all()
    words = np.random.default_rng(0).integers(0, 1 << 63, MAX_CHUNK + 100, dtype=np.uint64)
    grams = gram_hashes(words, 13)
    assert len(grams) == len(words) - 12
    around_the_cut = slice(MAX_CHUNK - 20, MAX_CHUNK + 20)
    assert (grams[around_the_cut] == gram_hashes(words[MAX_CHUNK - 20:MAX_CHUNK + 32], 13)).all()


def test_a_copied_passage_is_found_despite_case_punctuation_and_whitespace():
    index = NGramIndex(13)
    index.add(EVAL_PASSAGE)
    assert len(index) == len(words_of(EVAL_PASSAGE)) - 12
    disguised = EVAL_PASSAGE.upper().replace(",", " ;").replace(" ", "\n  ", 5)
    document = TRAINING_FILLER * 3 + disguised + " " + TRAINING_FILLER
    expected = "the mitochondria of a cell convert nutrients into adenosine triphosphate which powers most"
    assert index.match(document) == expected
    assert index.match(TRAINING_FILLER * 5) is None


def test_twelve_shared_words_are_not_a_match_and_thirteen_are():
    words = words_of(EVAL_PASSAGE)
    index = NGramIndex(13)
    index.add(EVAL_PASSAGE)
    twelve = TRAINING_FILLER + " ".join(words[7:19]) + " " + TRAINING_FILLER
    thirteen = TRAINING_FILLER + " ".join(words[7:20]) + " " + TRAINING_FILLER
    assert index.match(twelve) is None
    assert index.match(thirteen) == " ".join(words[7:20])
    # Twelve words from one place and one from another do not make a shared 13-gram either.
    assert index.match(" ".join(words[7:19] + ["bread"])) is None


def test_short_evaluation_texts_count_whole_and_very_short_ones_not_at_all():
    index = NGramIndex(13)
    short = "Which planet in the solar system has the most moons"  # 10 words
    index.add(short)
    index.add("What is the capital of France")  # 6 words: too common a phrase to index
    assert len(index) == 1 and index.short_lengths == {10}
    assert index.match(f"Quiz night. {short.upper()}? Saturn, probably.") == " ".join(words_of(short))
    assert index.match("Everyone knows what is the capital of France and much more besides that.") is None
    assert index.match("Which planet in the solar system has the most rings, and why?") is None


def test_the_first_shared_ngram_is_reported():
    index = NGramIndex(13)
    index.add(EVAL_PASSAGE)
    index.add(OTHER_PASSAGE)
    document = TRAINING_FILLER + OTHER_PASSAGE + " " + TRAINING_FILLER + EVAL_PASSAGE
    assert index.match(document) == " ".join(words_of(OTHER_PASSAGE)[:13])


def test_save_and_load_round_trip(tmp_path: Path):
    index = NGramIndex(10)
    texts = [EVAL_PASSAGE, OTHER_PASSAGE, "nine words that form one whole short evaluation item"]
    for text in texts:
        index.add(text)
    path = tmp_path / "index.npz"
    index.save(path)
    loaded = NGramIndex.load(path)
    assert loaded.n == 10 and len(loaded) == len(index) == len(reference_grams(texts, 10))
    assert (loaded.grams.sorted() == index.grams.sorted()).all() and loaded.short_lengths == {9}
    assert path.stat().st_size < 8 * len(index) + 2048  # 8 bytes per n-gram plus the .npz headers
    for document in (OTHER_PASSAGE.lower(), TRAINING_FILLER, "Nine words that form one whole short evaluation item!"):
        assert loaded.match(document) == index.match(document)
    assert loaded.match(TRAINING_FILLER) is None


def test_worker_processes_agree_on_the_hashes(tmp_path: Path):
    """An index built in a process with another hash seed matches here: no salted hash() is involved."""
    path = tmp_path / "index.npz"
    code = ("import sys; from pathlib import Path; from lmforge.data.decontaminate import NGramIndex; "
            "index = NGramIndex(13); index.add(sys.argv[1]); index.save(Path(sys.argv[2]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, EVAL_PASSAGE, str(path)], check=True, env=env)
    assert NGramIndex.load(path).match(TRAINING_FILLER + EVAL_PASSAGE.lower()) is not None


def test_build_index_reads_every_format(tmp_path: Path):
    folder = tmp_path / "evals"
    folder.mkdir()
    (folder / "a.txt").write_text(EVAL_PASSAGE)
    (folder / "b.md").write_text("# Heading\n\n" + OTHER_PASSAGE)
    records = [{"question": "Which planet in the solar system has the most moons", "id": "q1"},
               {"prompt": "A record without the field gives every string value it holds, nested ones too",
                "meta": {"note": "even this nested note of more than eight words counts here"}}]
    (folder / "c.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    seven = "Seven plus five equals twelve, which every child learns early"
    (tmp_path / "d.json").write_text(json.dumps([{"question": seven}]))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"question": "Compressed files are read as well as plain ones by the reader"}) + "\n")
    (tmp_path / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "Zstandard compressed text files are read too, whole, like any plain text file".encode()))
    paths = [folder, tmp_path / "d.json", tmp_path / "e.jsonl.gz", tmp_path / "f.txt.zst"]
    index = build_index([str(path) for path in paths], "question", 13)
    texts = [EVAL_PASSAGE, "# Heading\n\n" + OTHER_PASSAGE, records[0]["question"],
             "A record without the field gives every string value it holds, nested ones too",
             "even this nested note of more than eight words counts here",
             seven,
             "Compressed files are read as well as plain ones by the reader",
             "Zstandard compressed text files are read too, whole, like any plain text file"]
    assert len(index) == len(reference_grams(texts, 13))
    assert index.match("heading " + OTHER_PASSAGE) is not None
    assert index.match("So: seven plus five equals twelve, which every child learns early.") is not None
    assert index.match("compressed FILES are read as well as plain ones by the reader") is not None


def test_build_index_reads_csv_and_parquet(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "items.csv").write_text(f'question,answer\n"{EVAL_PASSAGE}",yes\n')
    pq.write_table(pa.table({"question": [OTHER_PASSAGE, None]}), tmp_path / "items.parquet")
    index = build_index([str(tmp_path / "items.csv"), str(tmp_path / "items.parquet")], "question", 13)
    assert len(index) == len(reference_grams([EVAL_PASSAGE, OTHER_PASSAGE], 13))


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("broken.jsonl", '{"question": "fine"}\n{"question": \n', "broken.jsonl:2: not valid JSON"),
    ("latin1.txt", b"caf\xe9 au lait", "cannot read evaluation file"),
    ("table.xlsx", "anything", "is not one of"),
    ("empty.txt", "", "holds no text"),
    ("items.csv", "prompt\nsomething\n", "has no column 'question'"),
])
def test_build_index_names_the_file_it_cannot_use(tmp_path: Path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(LmforgeError, match=message) as raised:
        build_index([str(path)], "question", 13)
    assert name in str(raised.value) and "\n" not in str(raised.value)


def test_loading_a_corrupt_index_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "index.npz"
    path.write_bytes(b"not an npz file")
    with pytest.raises(LmforgeError, match="cannot read the n-gram index"):
        NGramIndex.load(path)
    with pytest.raises(LmforgeError, match="cannot read the n-gram index"):
        NGramIndex.load(tmp_path / "absent.npz")


def test_an_empty_index_matches_nothing():
    index = NGramIndex(13)
    assert len(index) == 0 and index.match(EVAL_PASSAGE) is None


def test_a_large_index_keeps_every_ngram_findable():
    """Thousands of passages: every one is found, and unrelated text is not (the flag table never loses a member)."""
    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(5000)])
    passages = [" ".join(rng.choice(vocabulary, 30)) for _ in range(3000)]
    index = NGramIndex(13)
    for passage in passages:
        index.add(passage)
    assert len(index) == len(reference_grams(passages, 13))
    assert all(index.match("Preamble. " + passage.upper() + " the end") for passage in passages[::7])
    unrelated = [" ".join(rng.choice(vocabulary, 200)) for _ in range(50)]
    assert sum(index.match(text) is not None for text in unrelated) == 0
