"""Exact keys, MinHash signatures and near-duplicate clustering, on real text (pydoc topics) with planted duplicates
whose Jaccard similarity is computed exactly."""

from __future__ import annotations

import random
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from lmforge.config import DedupConfig
from lmforge.data.dedup import MinHasher, cluster_near_duplicates, cluster_report, exact_key, exact_keys
from lmforge.errors import LmforgeError

SHINGLE = 5


def topic_words() -> list[str]:
    from pydoc_data.topics import topics

    return re.findall(r"\w+", " ".join(topics[name] for name in sorted(topics)))


def shingle_set(text: str, k: int = SHINGLE) -> set[tuple[str, ...]]:
    """The reference: the exact set of k-word shingles the signature estimates."""
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i:i + k]) for i in range(max(1, len(words) - k + 1))} if words else set()


def jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def edited_copy(text: str, target: float, rng: random.Random, vocabulary: list[str]) -> tuple[str, float]:
    """A copy of `text` with words replaced or deleted until its exact shingle Jaccard drops to `target` or below."""
    words = text.split()
    while (similarity := jaccard(text, " ".join(words))) > target:
        position = rng.randrange(len(words))
        if rng.random() < 0.3 and len(words) > SHINGLE + 1:
            del words[position]
        else:
            words[position] = rng.choice(vocabulary)
    return " ".join(words), similarity


def keeper_of(texts: list[str], config: DedupConfig = DedupConfig()) -> tuple[np.ndarray, np.ndarray]:
    hasher = MinHasher(config.num_perm, config.shingle_words, config.seed)
    signatures = np.stack([hasher(text) for text in texts])
    return cluster_near_duplicates(signatures, config.bands, config.rows, config.threshold), signatures


def test_exact_key_folds_case_punctuation_and_whitespace():
    key = exact_key("hello world")
    assert isinstance(key, bytes) and len(key) == 16
    for same in ["Hello,  World!", " HELLO\tworld\n", "Hello—World…", "«hello» (world)", "hello\u00a0world"]:
        assert exact_key(same) == key, same
    assert exact_key("Ça va? Très   BIEN.") == exact_key("ça va très bien")
    assert exact_key("STRASSE") == exact_key("Straße")  # casefold, not just lower
    for different in ["hello word", "helloworld", "world hello", "hello world again", ""]:
        assert exact_key(different) != key, different


def test_minhash_estimate_matches_exact_jaccard():
    words = topic_words()
    rng = random.Random(1)
    hasher = MinHasher(128, SHINGLE, seed=0)
    errors, variances = [], []
    for _ in range(300):
        length = rng.randint(20, 300)
        start = rng.randrange(len(words) - length)
        text = " ".join(words[start:start + length])
        copy, similarity = edited_copy(text, rng.uniform(0.05, 1.0), rng, words)
        estimate = np.mean(hasher(text) == hasher(copy))
        errors.append(estimate - similarity)
        variances.append(similarity * (1 - similarity) / 128)  # of the estimate of an ideal MinHash
    errors, deviations = np.array(errors), np.sqrt(variances)
    assert abs(errors.mean()) < 0.01  # unbiased
    assert np.sqrt(np.mean(errors ** 2)) < 1.15 * np.sqrt(np.mean(variances))  # as accurate as ideal permutations
    assert np.all(np.abs(errors) <= 5 * deviations + 1e-9)


def test_signature_edge_cases():
    hasher = MinHasher(64, SHINGLE, seed=3)
    empty = hasher("")
    assert empty.dtype == np.uint32 and empty.shape == (64,) and np.all(empty == 0xFFFFFFFF)
    assert np.array_equal(hasher(" ... !!! — "), empty)
    # fewer words than a shingle: one shingle of all of them; case and punctuation do not matter
    assert np.array_equal(hasher("Hello, world!"), hasher("hello  WORLD"))
    assert not np.array_equal(hasher("hello world"), empty)
    assert not np.array_equal(hasher("hello world"), hasher("world hello"))
    # non-ASCII text takes another path to the same words
    text = " ".join(topic_words()[:400])
    assert np.array_equal(hasher(text + " — “»"), hasher(text))
    assert np.array_equal(hasher("Grüße aus Köln, ça va"), hasher("GRÜSSE AUS KÖLN ÇA VA"))  # casefold: ß is ss
    assert not np.array_equal(hasher("Grüße aus Köln ça va"), hasher("Gruse aus Koln ca va"))
    assert np.array_equal(MinHasher(64, SHINGLE, seed=3)(text), hasher(text))
    assert not np.array_equal(MinHasher(64, SHINGLE, seed=4)(text), hasher(text))


def test_long_text_signature_is_the_union_of_its_parts():
    """The signature of a set union is the elementwise minimum: a text longer than one hashing piece must agree."""
    words = topic_words()
    text_words = words[:30_000]  # ~170 KB: several pieces of MinHasher.PIECE_BYTES
    assert len(" ".join(text_words)) > 2 * MinHasher.PIECE_BYTES
    hasher = MinHasher(128, SHINGLE)
    cut = 12_345
    first, second = " ".join(text_words[:cut]), " ".join(text_words[cut - SHINGLE + 1:])
    assert np.array_equal(hasher(" ".join(text_words)), np.minimum(hasher(first), hasher(second)))
    giant_word = "x" * (MinHasher.PIECE_BYTES * 2 + 10)  # longer than a piece: still a signature, not an error
    assert hasher(f"a {giant_word} b").shape == (128,)


def varied_texts() -> list[str]:
    """Texts for the batch forms: empty, without words, shorter than a shingle, long (several hashing pieces and
    shingle blocks, a word longer than a piece), non-ASCII of many kinds, and prose with typographic punctuation."""
    words = topic_words()
    rng = random.Random(7)
    marks = ["’", "“", "”", "—", "…", "«", "»", "\u00a0", "½", "°", "🙂"]
    prose = []
    for _ in range(300):
        start = rng.randrange(len(words) - 400)
        chosen = words[start:start + rng.randint(0, 400)]
        prose.append(" ".join(word + (rng.choice(marks) if rng.random() < 0.05 else "") for word in chosen))
    return prose[:100] + [
        "", " ", "\n\t", "... !!! — “»", "  Leading space", "— leading dash", "one", "Two words", "three, words, here", "a b c d", "a b c d e", "_ __ _",
        "Grüße aus Köln, ça va", "ΟΔΥΣΣΕΥΣ ΚΑΙ ΣΙΣΥΦΟΣ", "Привет, мир! Как дела?", "日本語のテキストです。句読点も。",
        "ﬁne İstanbul ǅemal Ⅻ ²³", "e\u0301te\u0301 cafe\u0301", "lone \ud800 surrogate \udfff", "🙂🙂 emoji🙂only 🙂",
        " ".join(words[:30_000]),  # ~170 KB: several pieces of MinHasher.PIECE_BYTES
        "a " + "x" * (MinHasher.PIECE_BYTES * 2 + 10) + " b c",
    ] + prose[100:]


def test_batches_equal_one_text_at_a_time():
    texts = varied_texts()
    keys = [exact_key(text) for text in texts]
    assert exact_keys(texts) == keys and exact_keys([]) == []
    rng = np.random.default_rng(0)
    for num_perm, shingle_words, block in [(128, SHINGLE, None), (16, 1, None), (16, 2, 7), (8, 7, 61)]:
        hasher = MinHasher(num_perm, shingle_words, seed=5)
        if block:  # tiny shingle blocks: many texts start, end or go on at a block boundary
            hasher.SHINGLE_BLOCK = block
        one_by_one = np.stack([hasher(text) for text in texts])
        batch = hasher.batch(texts)
        assert batch.dtype == np.uint32 and batch.shape == (len(texts), num_perm)
        assert np.array_equal(batch, one_by_one)
        assert np.array_equal(hasher.batch([]), np.zeros((0, num_perm), np.uint32))
        order = rng.permutation(len(texts))
        for size in (1, 3, 64):  # other batch boundaries, in another order
            parts = [[texts[i] for i in order[i:i + size]] for i in range(0, len(order), size)]
            assert np.array_equal(np.concatenate([hasher.batch(part) for part in parts]), one_by_one[order])
            assert [key for part in parts for key in exact_keys(part)] == [keys[i] for i in order]


def reference_keeper(signatures: np.ndarray, bands: int, rows: int, min_equal: int) -> np.ndarray:
    """All pairs: linked when they share a band and agree in min_equal positions; keeper = smallest index in the
    connected component."""
    count = len(signatures)
    label = list(range(count))

    def find(i):
        while label[i] != i:
            i = label[i]
        return i

    empty = (signatures == 0xFFFFFFFF).all(axis=1)
    for i in range(count):
        for j in range(i + 1, count):
            if empty[i] or empty[j]:
                continue
            equal = signatures[i] == signatures[j]
            if equal.sum() >= min_equal and equal.reshape(bands, rows).all(axis=1).any():
                a, b = sorted((find(i), find(j)))
                label[b] = a
    return np.array([find(i) for i in range(count)])


def test_pivot_clustering_equals_the_all_pairs_reference():
    """Buckets with one big group, several dissimilar groups, chains and empty signatures: comparing with pivots
    must link exactly what comparing all pairs links."""
    rng = np.random.default_rng(7)
    bands, rows, per = 16, 8, 128
    rows_out = []
    shared_band = rng.integers(0, 2**32 - 1, rows, dtype=np.uint32)
    for group in range(12):
        base = rng.integers(0, 2**32 - 1, per, dtype=np.uint32)
        base[:rows] = shared_band  # every group shares band 0: one bucket holding all of them
        for _ in range(rng.integers(1, 6)):
            member = base.copy()
            changed = rng.choice(np.arange(rows, per), rng.integers(0, 60), replace=False)
            member[changed] = rng.integers(0, 2**32 - 1, changed.size)
            rows_out.append(member)
    chain_a = rng.integers(0, 2**32 - 1, per, dtype=np.uint32)
    # B differs from A in 30 positions, C from B in 30 others, spread so that band 0 is the only band B and C
    # share: only comparing C with B (not with the bucket's pivot A) within that bucket links them
    chain_b = chain_a.copy()
    chain_b[[8 * band + k for band in range(1, 16) for k in (0, 1)]] = rng.integers(0, 2**32 - 1, 30)
    chain_c = chain_b.copy()
    chain_c[[8 * band + k for band in range(1, 16) for k in (2, 3)]] = rng.integers(0, 2**32 - 1, 30)
    identical = rng.integers(0, 2**32 - 1, per, dtype=np.uint32)
    rows_out += [chain_c, chain_a, chain_b] + [identical] * 50 + [np.full(per, 0xFFFFFFFF, np.uint32)] * 3
    rows_out += list(rng.integers(0, 2**32 - 1, (40, per), dtype=np.uint32))
    order = rng.permutation(len(rows_out))
    signatures = np.stack(rows_out)[order]
    keeper = cluster_near_duplicates(signatures, bands, rows, 0.7)
    assert np.array_equal(keeper, reference_keeper(signatures, bands, rows, min_equal=90))
    position = {int(old): new for new, old in enumerate(order)}
    chain = [position[len(rows_out) - 96 + k] for k in range(3)]  # C, A, B: A~B and B~C, A and C differ (68/128)
    assert len({keeper[i] for i in chain}) == 1 and keeper[chain[0]] == min(chain)
    copies = [position[len(rows_out) - 93 + k] for k in range(50)]
    assert set(keeper[copies]) == {min(copies)}
    empties = [position[len(rows_out) - 43 + k] for k in range(3)]
    assert list(keeper[empties]) == empties  # never linked, every one kept
    assert np.array_equal(keeper[keeper], keeper) and np.all(keeper <= np.arange(len(keeper)))


def planted_corpus(seed: int = 0):
    """Real paragraphs, with planted copies at known exact Jaccard and 50 identical copies of one of them."""
    words = topic_words()
    rng = random.Random(seed)
    texts, planted = [], []  # planted: (original index, copy index, exact Jaccard)
    for start in range(0, 150 * 400, 400):
        texts.append(" ".join(words[start:start + rng.randint(60, 300)]))
    for target in [1.0, 0.95, 0.9, 0.9, 0.9, 0.85, 0.6, 0.5, 0.4, 0.3] * 5:
        original = rng.randrange(10, 150)  # not 7, whose 50 copies make a cluster of exactly 51
        copy, similarity = edited_copy(texts[original], target, rng, words)
        planted.append((original, len(texts), similarity))
        texts.append(copy)
    planted += [(7, len(texts) + k, 1.0) for k in range(50)]
    texts += [texts[7].upper()] * 50
    order = list(range(len(texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    return [texts[i] for i in order], [(where[a], where[b], similarity) for a, b, similarity in planted]


def components(count: int, pairs) -> np.ndarray:
    label = np.arange(count)
    for a, b in pairs:
        ra, rb = label[a], label[b]
        label[label == max(ra, rb)] = min(ra, rb)
    return label


def test_planted_near_duplicates_in_real_text():
    texts, planted = planted_corpus()
    keeper, _ = keeper_of(texts)
    for a, b, similarity in planted:
        if similarity >= 0.9:
            assert keeper[a] == keeper[b], similarity
        elif similarity <= 0.6:
            assert keeper[a] != keeper[b], similarity
    # against every pair's exact Jaccard: clusters of pairs >= 0.9 are found, and nothing joins a cluster except
    # through pairs >= 0.7
    sets = [shingle_set(text) for text in texts]
    pairs = [(i, j, len(sets[i] & sets[j]) / len(sets[i] | sets[j]))
             for i in range(len(texts)) for j in range(i + 1, len(texts)) if sets[i] & sets[j]]
    surely = components(len(texts), [(i, j) for i, j, s in pairs if s >= 0.9])
    possibly = components(len(texts), [(i, j) for i, j, s in pairs if s >= 0.7])
    for i in range(len(texts)):
        assert keeper[i] == keeper[surely[i]]
        assert possibly[i] == possibly[keeper[i]]
    # one keeper per cluster, the cluster's smallest index, and the 50 copies are one cluster that keeps one
    assert np.array_equal(keeper[keeper], keeper) and np.all(keeper <= np.arange(len(texts)))
    copies = [b for a, b, _ in planted[-50:]] + [planted[-1][0]]
    assert set(keeper[copies]) == {min(copies)}
    report = cluster_report(keeper, [f"doc{i}" for i in range(len(texts))])
    # (pydoc topics repeat some passages, so real near-copies of document 7 may join its cluster)
    cluster = np.flatnonzero(keeper == min(copies))
    assert report["largest"][0] == {"keeper": f"doc{min(copies)}", "size": cluster.size,
                                    "members": [f"doc{i}" for i in cluster[:5]]}
    assert cluster.size >= 51
    assert report["documents_removed"] == len(texts) - len(set(keeper.tolist())) >= 50 + 25  # each copy at 0.9 or more goes


def test_chain_of_near_duplicates_in_real_text_is_one_cluster():
    """A~B and B~C but not A~C (exact and estimated): one cluster, A kept."""
    words = topic_words()
    rng = random.Random(5)
    a = " ".join(words[5000:5300])
    half = len(a.split()) // 2
    b_head, _ = edited_copy(" ".join(a.split()[:half]), 0.49, rng, words)
    b = b_head + " " + " ".join(a.split()[half:])
    c_tail, _ = edited_copy(" ".join(b.split()[-half:]), 0.49, rng, words)
    c = " ".join(b.split()[:-half]) + " " + c_tail
    config = DedupConfig(num_perm=256, bands=64, rows=4, threshold=0.6)
    filler = [" ".join(words[start:start + 200]) for start in range(20_000, 30_000, 1000)]
    texts = filler[:3] + [c, a] + filler[3:] + [b]
    keeper, signatures = keeper_of(texts, config)
    ia, ib, ic = 4, len(texts) - 1, 3
    assert jaccard(a, b) > 0.68 and jaccard(b, c) > 0.68 and jaccard(a, c) < 0.52
    estimate = lambda i, j: np.mean(signatures[i] == signatures[j])  # noqa: E731
    assert estimate(ia, ib) >= 0.6 and estimate(ib, ic) >= 0.6 and estimate(ia, ic) < 0.6
    assert keeper[ia] == keeper[ib] == keeper[ic] == ic  # C comes first in the corpus
    assert list(keeper[:3]) == [0, 1, 2] and list(keeper[5:-1]) == list(range(5, len(texts) - 1))


def signatures_of(texts: list[str]) -> np.ndarray:
    hasher = MinHasher(**{name: getattr(DedupConfig(), name) for name in ("num_perm", "shingle_words", "seed")})
    return np.stack([hasher(text) for text in texts])


def test_results_do_not_depend_on_process_or_order(tmp_path):
    texts, _ = planted_corpus(seed=1)
    texts = texts[:200]
    here = signatures_of(texts)
    # other processes (their own hash seeds), the rows computed in reverse order and in uneven batches
    batches = [texts[i:j] for i, j in [(150, 200), (60, 150), (0, 60)]]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        elsewhere = np.concatenate(list(pool.map(signatures_of, batches))[::-1])
        keys = list(pool.map(exact_key, texts, chunksize=16))
    assert np.array_equal(here, elsewhere)
    assert keys == [exact_key(text) for text in texts]
    config = DedupConfig()
    keeper = cluster_near_duplicates(here, config.bands, config.rows, config.threshold)
    np.save(tmp_path / "signatures.npy", elsewhere)
    mapped = np.load(tmp_path / "signatures.npy", mmap_mode="r")
    assert np.array_equal(cluster_near_duplicates(mapped, config.bands, config.rows, config.threshold), keeper)
    # documents in another order: the same clusters, each kept by its smallest index in the new order
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled = cluster_near_duplicates(here[order], config.bands, config.rows, config.threshold)
    clusters = lambda keep, ids: {frozenset(ids[keep == k].tolist()) for k in np.unique(keep)}  # noqa: E731
    assert clusters(shuffled, order) == clusters(keeper, np.arange(len(texts)))
    for k in np.unique(shuffled):
        assert k == np.flatnonzero(shuffled == k).min()


def test_cluster_report_counts():
    keeper = np.array([0, 1, 0, 3, 1, 0, 6, 3])
    report = cluster_report(keeper, lambda i: f"id{i}", examples=2)
    assert report == {
        "clusters": 3, "documents_removed": 4, "size_histogram": {2: 2, 3: 1},
        "largest": [{"keeper": "id0", "size": 3, "members": ["id0", "id2", "id5"]},
                    {"keeper": "id1", "size": 2, "members": ["id1", "id4"]}],
    }
    assert cluster_report(np.arange(4), ["a", "b", "c", "d"]) == {"clusters": 0, "documents_removed": 0,
                                                                  "size_histogram": {}, "largest": []}


def test_bad_input_is_a_clear_error():
    signatures = np.zeros((4, 128), np.uint32)
    with pytest.raises(LmforgeError, match="bands x rows"):
        cluster_near_duplicates(signatures, 10, 8, 0.8)
    with pytest.raises(LmforgeError, match="uint32"):
        cluster_near_duplicates(signatures.astype(np.int64), 16, 8, 0.8)
    with pytest.raises(LmforgeError, match="threshold"):
        cluster_near_duplicates(signatures, 16, 8, 0.0)
    with pytest.raises(LmforgeError, match="num_perm"):
        MinHasher(0)
    assert list(cluster_near_duplicates(np.zeros((0, 128), np.uint32), 16, 8, 0.8)) == []
