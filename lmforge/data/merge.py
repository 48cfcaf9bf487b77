"""The merge: global steps over every finished shard, then the final data folder.

1. Exact dedup: documents with the same normalised-text key; the first in reading order stays.
2. Near-dedup: MinHash LSH over the exact survivors' signatures (on disk, memory-mapped); each cluster keeps
   its first document. Every removed document names the document kept for its cluster.
3. Split by content hash into train / val / test (optionally stratified by source).
4. Mixing: each source's training documents are written ``weight`` times on average (0.5 keeps half of them,
   chosen by hash; 2 writes each twice). Validation and test are never reweighted, so evaluation stays honest.

Documents are numbered in reading order (shard by shard), which is the same however many workers or
tasks made the shards, so the output is too.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.plan import Source
from lmforge.data.process import GLOBAL_STEPS, STEPS, StepStats

SPLITS = ("train", "val", "test")  # the order is the split code: 0 train, 1 val, 2 test
MAX_LISTED_SKIPPED_FILES = 1000


@dataclass
class ShardArrays:
    """The merge's view of every finished shard, concatenated in shard order."""

    counts: list[int]  # documents per shard
    keys: np.ndarray  # (N, 16) uint8
    hashes: np.ndarray  # (N, 2) uint64
    sources: np.ndarray  # (N,) int32
    chars: np.ndarray  # (N,) int64
    languages: np.ndarray  # (N,) str


def load_arrays(shard_dirs: list[Path]) -> ShardArrays:
    parts = [np.load(folder / "dedup.npz") for folder in shard_dirs]
    counts = [len(part["chars"]) for part in parts]

    def joined(name: str, empty: np.ndarray) -> np.ndarray:
        arrays = [part[name] for part in parts]
        return np.concatenate(arrays) if arrays else empty

    return ShardArrays(counts, joined("keys", np.zeros((0, 16), np.uint8)), joined("hashes", np.zeros((0, 2), np.uint64)),
                       joined("sources", np.zeros(0, np.int32)), joined("chars", np.zeros(0, np.int64)),
                       joined("languages", np.zeros(0, "<U8")))


def exact_duplicates(keys: np.ndarray) -> np.ndarray:
    """For each document, the index of the first document with the same key (itself when it is the first)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    as_bytes = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return first[inverse.ravel()].astype(np.int64)


def near_duplicates(shard_dirs: list[Path], counts: list[int], survivors: np.ndarray, config: DataConfig, work_dir: Path,
                    progress: bool) -> np.ndarray:
    """For each survivor of exact dedup, the index (global) of the document its near-duplicate cluster keeps."""
    from lmforge.data.dedup import cluster_near_duplicates

    dedup = config.dedup
    if not dedup.near or len(survivors) < 2:
        return survivors.copy()
    # The survivors' signatures, gathered shard by shard into one file that the clustering memory-maps.
    path = work_dir / "survivor_signatures.npy"
    gathered = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(len(survivors), dedup.num_perm))
    starts = np.cumsum([0, *counts])
    written = 0
    for shard, folder in enumerate(shard_dirs):
        low, high = np.searchsorted(survivors, [starts[shard], starts[shard + 1]])
        if high > low:
            signatures = np.load(folder / "signatures.npy", mmap_mode="r")
            gathered[written : written + high - low] = signatures[survivors[low:high] - starts[shard]]
            written += high - low
    gathered.flush()
    keeper = cluster_near_duplicates(np.load(path, mmap_mode="r"), dedup.bands, dedup.rows, dedup.threshold, progress=progress)
    path.unlink()
    return survivors[keeper]


def assign_splits(arrays: ShardArrays, kept: np.ndarray, config: DataConfig) -> np.ndarray:
    """0 train, 1 val, 2 test for each kept document (indices into ``kept``), by the first content hash.

    Unstratified: a document is val when its hash position is below val_fraction, test when below val + test.
    Stratified: within each source, the lowest-hashed round(n x fraction) documents go to val, the next to test,
    so every source is split in the same proportions. With a nonzero fraction and two or more documents, a
    split is never empty (the document nearest its boundary changes side); a single document goes to train.
    """
    positions = arrays.hashes[kept, 0].astype(np.float64) / 2.0**64
    split = np.zeros(len(kept), np.int8)
    if len(kept) == 0:
        return split
    if config.stratify_by_source:
        for source in np.unique(arrays.sources[kept]):
            members = np.flatnonzero(arrays.sources[kept] == source)
            ordered = members[np.argsort(positions[members], kind="stable")]
            n_val = round(len(members) * config.val_fraction)
            n_test = round(len(members) * config.test_fraction)
            split[ordered[:n_val]] = 1
            split[ordered[n_val : n_val + n_test]] = 2
    else:
        split[positions < config.val_fraction + config.test_fraction] = 2
        split[positions < config.val_fraction] = 1
    if len(kept) == 1:
        split[:] = 0
        return split
    for code, fraction in ((1, config.val_fraction), (2, config.test_fraction)):
        if fraction > 0 and not np.any(split == code):
            candidates = np.flatnonzero(split == 0)
            if len(candidates) > 1:
                split[candidates[np.argmin(np.abs(positions[candidates] - fraction))]] = code
    if not np.any(split == 0):
        split[np.argmax(positions)] = 0
    return split


def mix_repeats(arrays: ShardArrays, kept: np.ndarray, split: np.ndarray, sources: list[Source]) -> np.ndarray:
    """How many times each kept document is written: floor(weight), plus one more for a hash-chosen fraction; 1 outside train."""
    weights = np.array([source.weight for source in sources], np.float64)[arrays.sources[kept]]
    position = arrays.hashes[kept, 1].astype(np.float64) / 2.0**64
    repeats = np.floor(weights).astype(np.int64) + (position < weights - np.floor(weights))
    repeats[split != 0] = 1
    return repeats


def length_histogram(chars: np.ndarray) -> dict:
    """Document lengths in characters over log-spaced bins (powers of two)."""
    if len(chars) == 0:
        return {"edges": [], "counts": []}
    top = max(1, int(math.ceil(math.log2(max(int(chars.max()), 2)))))
    edges = [0] + [2**power for power in range(4, top + 1)]
    if edges[-1] <= chars.max():
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(chars, bins=edges)
    return {"edges": edges, "counts": counts.tolist()}


def summarize_steps(dones: list[dict]) -> dict[str, StepStats]:
    totals = {name: StepStats() for name in STEPS}
    for done in dones:
        for name, data in done["steps"].items():
            totals[name].add(StepStats.from_json(data))
    return totals


def merge_shards(shard_dirs: list[Path], dones: list[dict], sources: list[Source], config: DataConfig, out_dir: Path,
                 work_dir: Path, writer_factory, plan_skipped: list[dict], progress: bool) -> tuple[dict, list[dict]]:
    """Run the global steps and write the final shards into ``out_dir``; returns the report (without timings) and the
    files the workers skipped.

    The rejected log is written in an order that does not depend on how the inputs were cut into shards: files
    skipped when planning, then every shard's rejections, then the duplicates and the documents the mix leaves out."""
    arrays = load_arrays(shard_dirs)
    total = len(arrays.chars)
    order = np.arange(total, dtype=np.int64)
    first = exact_duplicates(arrays.keys) if config.dedup.exact else order.copy()
    survivors = np.flatnonzero(first == order)
    keeper = first.copy()
    keeper[survivors] = near_duplicates(shard_dirs, arrays.counts, survivors, config, work_dir, progress)
    keeper = keeper[keeper]  # an exact duplicate of a near-duplicate points at the document its cluster keeps
    removed_exact = first != order
    removed_near = (keeper != order) & ~removed_exact
    kept = np.flatnonzero(keeper == order)
    split = assign_splits(arrays, kept, config)
    repeats = mix_repeats(arrays, kept, split, sources)
    split_of = np.full(total, -1, np.int8)
    split_of[kept] = split
    repeats_of = np.zeros(total, np.int64)
    repeats_of[kept] = repeats
    mixed_out = np.zeros(total, bool)  # training documents a weight below 1 leaves out: logged, like every drop
    mixed_out[kept[(split == 0) & (repeats == 0)]] = True
    split_of[mixed_out] = -1

    in_clusters = np.zeros(total, bool)
    in_clusters[keeper[keeper != order]] = True
    in_clusters |= keeper != order
    ids_in_clusters: dict[int, str] = {}
    split_stats = {name: {"documents": 0, "chars": 0} for name in SPLITS}
    written_chars_by_source: Counter = Counter()
    written_docs_by_source: Counter = Counter()
    with writer_factory(out_dir / "rejected", "rejected") as rejected, writer_factory(out_dir, "train") as train, \
            writer_factory(out_dir, "val") as val, writer_factory(out_dir, "test") as test:
        writers = (train, val, test)
        for item in plan_skipped:
            rejected.write({"id": item["path"], "text": "", "source": item["path"], "reason": item["reason"],
                            "detail": item["detail"], "file_skipped": True})
        for folder in shard_dirs:
            with open(folder / "rejected.jsonl", "rb") as lines:
                for line in lines:
                    rejected.write_line(line)
        index = 0
        for folder in shard_dirs:
            with open(folder / "docs.jsonl", "rb") as lines:
                for line in lines:
                    if in_clusters[index] or mixed_out[index]:
                        record = json.loads(line)
                        ids_in_clusters[index] = record["id"]
                        if keeper[index] != index:
                            reason = "duplicate" if removed_exact[index] else "near_duplicate"
                            record.update(reason=reason, duplicate_of=ids_in_clusters[int(keeper[index])])
                            rejected.write_line((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                        elif mixed_out[index]:
                            record.update(reason="mix_subsampled", detail=f"source weight {sources[int(arrays.sources[index])].weight}")
                            rejected.write_line((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                    if split_of[index] >= 0:
                        chars = int(arrays.chars[index])
                        name = SPLITS[split_of[index]]
                        split_stats[name]["documents"] += 1
                        split_stats[name]["chars"] += chars
                        source = int(arrays.sources[index])
                        for _ in range(repeats_of[index]):
                            writers[split_of[index]].write_line(line)
                        if split_of[index] == 0:
                            written_docs_by_source[source] += int(repeats_of[index])
                            written_chars_by_source[source] += chars * int(repeats_of[index])
                    index += 1

    from lmforge.data.dedup import cluster_report

    written = kept[~mixed_out[kept]]

    steps = summarize_steps(dones)
    global_steps = {name: StepStats() for name in GLOBAL_STEPS}
    exact_step, near_step, split_step, mix_step = (global_steps[name] for name in GLOBAL_STEPS)
    exact_step.documents_in = total
    if removed_exact.any():
        exact_step.rejected["duplicate"] = int(removed_exact.sum())
    exact_step.documents_out = near_step.documents_in = total - int(removed_exact.sum())
    if removed_near.any():
        near_step.rejected["near_duplicate"] = int(removed_near.sum())
    near_step.documents_out = split_step.documents_in = split_step.documents_out = mix_step.documents_in = len(kept)
    if mixed_out.any():
        mix_step.rejected["mix_subsampled"] = int(mixed_out.sum())
    mix_step.documents_out = len(kept) - int(mixed_out.sum())
    for step in global_steps.values():
        step.bytes_in = step.bytes_out = None  # not tracked: the merge never decodes most documents
    for step, mask in ((exact_step, removed_exact), (near_step, removed_near), (mix_step, mixed_out)):
        for reason in step.rejected:
            step.examples[reason] = [ids_in_clusters[int(i)] for i in np.flatnonzero(mask)[:3]]
    split_step.changed.update({name: stats["documents"] for name, stats in split_stats.items()})
    all_steps = {**steps, **global_steps}

    files_read = sum(done["files"]["read"] for done in dones)
    skipped = [item for done in dones for item in done["files"]["skipped"]]
    rejected_counts: Counter = Counter()
    for stats in all_steps.values():
        rejected_counts.update(stats.rejected)
    report = {
        "sources": [source.spec for source in sources],
        "shards": len(shard_dirs),
        "files_read": files_read,
        "documents_read": steps["read"].documents_in,
        "documents_after_cutting": sum(steps["read"].rejected.values()) + steps["cut"].documents_out,
        "rejected": dict(sorted(rejected_counts.items())),
        "rejected_total": sum(rejected_counts.values()),
        "kept": mix_step.documents_out,
        "steps": [{"step": name, **stats.to_json()} for name, stats in all_steps.items()],
        "dedup": {"exact_removed": int(removed_exact.sum()), "near_removed": int(removed_near.sum()),
                  "clusters": cluster_report(keeper, ids_in_clusters.__getitem__)},
        "languages": dict(Counter(arrays.languages[written].tolist()).most_common()),
        "length_histogram": length_histogram(arrays.chars[written]),
        "mix": mix_report(sources, arrays, kept, split, written_docs_by_source, written_chars_by_source),
        "stdlib_modules_failed": [item for done in dones for item in done["files"]["stdlib_modules_failed"]],
        "worker_seconds": worker_seconds(dones, steps),
    }
    for name in SPLITS:
        report[f"{name}_documents"] = split_stats[name]["documents"]
        report[f"{name}_chars"] = split_stats[name]["chars"]
    return report, skipped


def worker_seconds(dones: list[dict], steps: dict[str, StepStats]) -> dict[str, float]:
    """CPU seconds in the workers, per step and for writing and dedup signatures, summed over shards."""
    seconds: Counter = Counter({name: stats.seconds for name, stats in steps.items()})
    for done in dones:
        seconds.update(done.get("seconds", {}))
    return {name: round(value, 2) for name, value in seconds.items()}


def mix_report(sources, arrays, kept, split, docs_written: Counter, chars_written: Counter) -> list[dict]:
    total_chars = sum(chars_written.values()) or 1
    rows = []
    for source in sources:
        mine = arrays.sources[kept] == source.index
        rows.append({"source": source.spec, "weight": source.weight, "documents": int(mine.sum()),
                     "chars": int(arrays.chars[kept][mine].sum()), "train_documents_written": docs_written[source.index],
                     "train_chars_written": chars_written[source.index],
                     "train_share": round(chars_written[source.index] / total_chars, 4)})
    return rows
