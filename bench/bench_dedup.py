"""Near-duplicate detection: recall and precision against exact all-pairs Jaccard, and speed at a million documents.

    python bench/bench_dedup.py quality [--docs 3000] [--threshold 0.8] [--settings 16x8,32x4,8x16,20x10,32x8]
    python bench/bench_dedup.py scale [--docs 1000000] [--peer-sample 5000]

Documents are made of real sentences (the pydoc topics shipped with Python), drawn at random.

`quality`: a third of the documents are planted edited copies of others (words replaced or deleted until
the exact 5-word-shingle Jaccard with the original drops to a target drawn from 0.45..1.0; a tenth are
exact copies). The reference
is the exact Jaccard of every pair (all ~4.5M pairs of 3,000 documents: pairs without a common shingle
are 0, the rest are counted through an inverted index). For each bands x rows setting it reports, per
band of exact Jaccard, the fraction of pairs that end in one cluster; pair recall and precision at the
threshold; and, for the documents removed, precision and recall against the reference's removals
(keep the smallest index of each connected component of pairs at or above the threshold).

`scale`: short documents (200-500 bytes), 10% of them planted copies of a recent document (exact,
re-cased and re-punctuated, or with 1-3 words replaced). Signatures are written to a .npy file and
clustered from a memmap, as the data stage's merge step does. Reports the time of exact keys (exact_keys),
signatures and clustering apart, documents/s, peak RSS, and datasketch's MinHash (same shingles,
same permutation count, permutations reused) on a sample as the peer.
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lmforge.data.dedup import MinHasher, cluster_near_duplicates, cluster_report, exact_keys

SHINGLE_WORDS = 5
BATCH = 256  # documents per exact_keys / MinHasher.batch call, as a data worker calls them
WORD = re.compile(r"\w+")


def real_sentences(max_words: int = 60) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[name] for name in sorted(topics))
    sentences = (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text))
    return sorted({s for s in sentences if 4 <= len(s.split()) <= max_words})


def document(rng: random.Random, sentences: list[str], min_bytes: int, max_bytes: int, min_sentences: int = 1) -> str:
    goal = rng.randint(min_bytes, max_bytes)
    parts, size = [], 0
    while size < goal or len(parts) < min_sentences:
        parts.append(rng.choice(sentences))
        size += len(parts[-1]) + 1
    return " ".join(parts)[:max_bytes]


def shingles(text: str) -> set[str]:
    words = WORD.findall(text.casefold())
    return {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))} if words else set()


def edited_copy(text: str, target: float, rng: random.Random, vocabulary: list[str]) -> tuple[str, float]:
    """Replace or delete words until the exact shingle Jaccard with `text` is at most `target`."""
    original, words = shingles(text), text.split()
    while True:
        copy = shingles(" ".join(words))
        similarity = len(original & copy) / len(original | copy)
        if similarity <= target:
            return " ".join(words), similarity
        position = rng.randrange(len(words))
        if rng.random() < 0.3 and len(words) > SHINGLE_WORDS + 1:
            del words[position]
        else:
            words[position] = rng.choice(vocabulary)


def exact_pair_jaccard(texts: list[str]) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair sharing at least one shingle (every other pair is 0)."""
    sets = [shingles(text) for text in texts]
    holders: dict[str, list[int]] = defaultdict(list)
    for index, shingle_set in enumerate(sets):
        for shingle in shingle_set:
            holders[shingle].append(index)
    shared: Counter = Counter()
    for documents in holders.values():
        for position, first in enumerate(documents):
            for second in documents[position + 1:]:
                shared[first, second] += 1
    return {(a, b): n / (len(sets[a]) + len(sets[b]) - n) for (a, b), n in shared.items()}


def reference_removed(count: int, similarities: dict[tuple[int, int], float], threshold: float) -> set[int]:
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), similarity in similarities.items():
        if similarity >= threshold:
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    return {i for i in range(count) if root(i) != i}


def quality(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    sentences = real_sentences()
    vocabulary = WORD.findall(" ".join(sentences))
    planted = args.docs // 3
    texts = [document(rng, sentences, 400, 2000) for _ in range(args.docs - planted)]
    for _ in range(planted):
        target = 1.0 if rng.random() < 0.1 else rng.uniform(0.45, 1.0)  # a tenth are exact copies
        copy, _ = edited_copy(rng.choice(texts[:args.docs - planted]), target, rng, vocabulary)
        texts.append(copy)
    rng.shuffle(texts)
    started = time.perf_counter()
    similarities = exact_pair_jaccard(texts)
    print(f"{len(texts)} documents ({sum(map(len, texts)) / 1e6:.1f} MB), {len(texts) * (len(texts) - 1) // 2:,} pairs, "
          f"{len(similarities):,} share a shingle; exact reference in {time.perf_counter() - started:.1f} s")
    edges = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    labels = [f"{low:.2f}-{high:.2f}" for low, high in zip(edges, edges[1:])] + ["1.0"]
    pairs = np.array(list(similarities.keys()), dtype=np.int64).reshape(-1, 2)
    values = np.array(list(similarities.values()))
    bucket = np.where(values >= 1.0, len(edges) - 1, np.searchsorted(edges, values, side="right") - 1)
    counts = [int(np.count_nonzero(bucket == b)) for b in range(len(labels))]
    print("\npairs per exact-Jaccard band: " + ", ".join(f"{label}: {n}" for label, n in zip(labels, counts)))
    true_removed = reference_removed(len(texts), similarities, args.threshold)
    positive = values >= args.threshold
    print(f"\nFraction of pairs in one cluster, by exact Jaccard (threshold {args.threshold}):\n")
    print("| bands x rows | num_perm | " + " | ".join(labels) + " | pair recall | pair precision | removed: recall | "
          "removed: precision | signatures | clustering |")
    print("| --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: | ---: | ---: | ---: | ---: | ---: |")
    for setting in args.settings.split(","):
        bands, rows = map(int, setting.split("x"))
        hasher = MinHasher(bands * rows, SHINGLE_WORDS, seed=0)
        started = time.perf_counter()
        signatures = np.stack([hasher(text) for text in texts])
        signing = time.perf_counter() - started
        started = time.perf_counter()
        keeper = cluster_near_duplicates(signatures, bands, rows, args.threshold)
        clustering = time.perf_counter() - started
        together = keeper[pairs[:, 0]] == keeper[pairs[:, 1]]
        found = [together[bucket == b].mean() if counts[b] else float("nan") for b in range(len(labels))]
        sizes = np.bincount(keeper)
        same_cluster_pairs = int((sizes * (sizes - 1) // 2).sum())
        removed = set(np.flatnonzero(keeper != np.arange(len(texts))).tolist())
        hits = len(removed & true_removed)
        print(f"| {bands} x {rows} | {bands * rows} | " + " | ".join(f"{f:.3f}" for f in found) +
              f" | {together[positive].mean():.3f} | {np.count_nonzero(together & positive) / max(same_cluster_pairs, 1):.3f}"
              f" | {hits / max(len(true_removed), 1):.3f} | {hits / max(len(removed), 1):.3f}"
              f" | {len(texts) / signing:,.0f} docs/s | {clustering * 1000:.0f} ms |", flush=True)
    print(f"\n(reference removes {len(true_removed)} documents; pair precision counts every pair inside a cluster, so chains "
          f"A~B~C with A, C below the threshold lower it)")


def short_documents(count: int, seed: int):
    """(text, kind, original, jaccard) for `count` documents of 200-500 bytes. 10% are copies of one of the last
    10,000 documents (index `original`, exact shingle Jaccard `jaccard`): kind "exact", "folded" (case and
    punctuation changed) or "near" (1-3 words replaced); the others have kind None."""
    rng = random.Random(seed)
    # three or more short sentences each, so that documents not planted are (almost) never duplicates by chance
    sentences = real_sentences(max_words=25)
    vocabulary = WORD.findall(" ".join(sentences[:2000]))
    recent: list[tuple[int, str]] = []
    for index in range(count):
        if recent and rng.random() < 0.1:
            (original, text), kind = rng.choice(recent), rng.choice(["exact", "folded", "near"])
            similarity = 1.0
            if kind == "folded":
                text = text.upper().replace(".", "!").replace(",", " ;")
            elif kind == "near":
                words = text.split()
                for _ in range(rng.randint(1, 3)):
                    words[rng.randrange(len(words))] = rng.choice(vocabulary)
                copy = " ".join(words)
                a, b = shingles(text), shingles(copy)
                text, similarity = copy, len(a & b) / len(a | b)
            yield text, kind, original, similarity
            continue
        text = document(rng, sentences, 200, 500, min_sentences=3)
        if len(recent) < 10_000:
            recent.append((index, text))
        else:
            recent[index % 10_000] = (index, text)
        yield text, None, -1, 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(args: argparse.Namespace) -> None:
    from lmforge.config import DedupConfig

    config = DedupConfig()
    hasher = MinHasher(config.num_perm, config.shingle_words, config.seed)
    planted = []  # (kind, copy index, original index, exact Jaccard)
    total_bytes = 0
    key_seconds = signature_seconds = 0.0
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "signatures.npy"
        signatures = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(args.docs, config.num_perm))
        keys = np.empty(args.docs, dtype="S16")
        started = time.perf_counter()
        batch = []
        for index, (text, kind, original, similarity) in enumerate(short_documents(args.docs, args.seed)):
            if kind:
                planted.append((kind, index, original, similarity))
            total_bytes += len(text)
            batch.append(text)
            if len(batch) == BATCH or index == args.docs - 1:
                first = index + 1 - len(batch)
                tick = time.perf_counter()
                keys[first:index + 1] = exact_keys(batch)
                tock = time.perf_counter()
                signatures[first:index + 1] = hasher.batch(batch)
                signature_seconds += time.perf_counter() - tock
                key_seconds += tock - tick
                batch = []
        generation = time.perf_counter() - started - key_seconds - signature_seconds
        signatures.flush()
        del signatures
        rss_after_signatures = peak_rss_mb()
        mapped = np.load(path, mmap_mode="r")
        started = time.perf_counter()
        keeper = cluster_near_duplicates(mapped, config.bands, config.rows, config.threshold, progress=args.progress)
        clustering = time.perf_counter() - started
        del mapped
    report = cluster_report(keeper, str, examples=3)
    kinds = Counter(kind for kind, *_ in planted)
    print(f"{args.docs:,} documents, {total_bytes / 1e6:.0f} MB (mean {total_bytes / args.docs:.0f} bytes), {len(planted):,} planted "
          f"copies ({kinds['exact']:,} exact, {kinds['folded']:,} re-cased and re-punctuated, {kinds['near']:,} with 1-3 words "
          f"replaced); num_perm {config.num_perm}, {config.bands} x {config.rows}, threshold {config.threshold}\n")
    print("| phase | seconds | documents/s | MB/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in [("exact keys", key_seconds), ("MinHash signatures", signature_seconds), ("LSH clustering", clustering)]:
        print(f"| {name} | {seconds:.1f} | {args.docs / seconds:,.0f} | {total_bytes / 1e6 / seconds:.1f} |")
    print(f"| (generating the documents) | {generation:.1f} | | |")
    print(f"\npeak RSS: {rss_after_signatures:,.0f} MB after signatures, {peak_rss_mb():,.0f} MB after clustering "
          f"(including the pages of the {args.docs * config.num_perm * 4 / 2**20:,.0f} MiB signatures file)")
    print("\n| planted copies | pairs | in the original's cluster |")
    print("| --- | ---: | ---: |")
    groups = {"exact": lambda k, s: k == "exact", "re-cased, re-punctuated": lambda k, s: k == "folded",
              f"1-3 words replaced, Jaccard >= {config.threshold}": lambda k, s: k == "near" and s >= config.threshold,
              f"1-3 words replaced, Jaccard < {config.threshold}": lambda k, s: k == "near" and s < config.threshold}
    for name, belongs in groups.items():
        pairs = [(copy, original) for kind, copy, original, similarity in planted if belongs(kind, similarity)]
        found = sum(keeper[copy] == keeper[original] for copy, original in pairs)
        print(f"| {name} | {len(pairs):,} | {found / max(len(pairs), 1):.3f} |")
    print(f"\nexact keys remove {len(keys) - len(np.unique(keys)):,} documents; near-duplicate clustering: {report['clusters']:,} "
          f"clusters, {report['documents_removed']:,} documents removed; cluster sizes {report['size_histogram']}")
    peer(args, config)


def peer(args: argparse.Namespace, config) -> None:
    from datasketch import MinHash

    sample = [text for text, *_ in short_documents(args.peer_sample, args.seed + 1)]
    hasher = MinHasher(config.num_perm, config.shingle_words, config.seed)
    template = MinHash(config.num_perm, seed=1)

    def theirs(text: str) -> np.ndarray:
        words = WORD.findall(text.casefold())
        grams = [" ".join(words[i:i + SHINGLE_WORDS]).encode() for i in range(max(1, len(words) - SHINGLE_WORDS + 1))]
        minhash = MinHash(config.num_perm, permutations=template.permutations, scheme=template.scheme)
        minhash.update_batch(grams)
        return minhash.hashvalues

    implementations = {  # each computes the signatures of a list of texts
        "lmforge MinHasher": lambda texts: [hasher(text) for text in texts],
        f"lmforge MinHasher.batch ({BATCH} a call)": lambda texts: [hasher.batch(texts[start:start + BATCH])
                                                                   for start in range(0, len(texts), BATCH)],
        "datasketch MinHash (update_batch)": lambda texts: [theirs(text) for text in texts],
    }
    rates = {}
    for name, function in implementations.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            function(sample)
            best = min(best, time.perf_counter() - started)
        rates[name] = len(sample) / best
    print(f"\nSignatures of {len(sample):,} short documents (text to signature, {config.num_perm} permutations, best of 3):\n")
    print("| implementation | signatures/s | ratio |")
    print("| --- | ---: | ---: |")
    ours = rates["lmforge MinHasher"]
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / ours:.2f}x |")
    print(f"\nlmforge is {ours / rates['datasketch MinHash (update_batch)']:.1f}x datasketch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    quality_parser = commands.add_parser("quality", help="recall and precision against exact all-pairs Jaccard")
    quality_parser.add_argument("--docs", type=int, default=3000)
    quality_parser.add_argument("--threshold", type=float, default=0.8)
    quality_parser.add_argument("--settings", default="16x8,32x4,8x16,20x10,32x8", help="bands x rows settings, comma-separated")
    quality_parser.add_argument("--seed", type=int, default=0)
    scale_parser = commands.add_parser("scale", help="time and memory at --docs short documents, datasketch as the peer")
    scale_parser.add_argument("--docs", type=int, default=1_000_000)
    scale_parser.add_argument("--peer-sample", type=int, default=5000)
    scale_parser.add_argument("--seed", type=int, default=0)
    scale_parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    quality(args) if args.command == "quality" else scale(args)


if __name__ == "__main__":
    main()
