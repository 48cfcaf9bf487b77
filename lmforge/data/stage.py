"""The data stage: read the sources, run every step, deduplicate, split and mix, and write the data folder.

The folder it writes::

    train-00000.jsonl.gz ...     kept documents, {"id", "text", "source", "chars", provenance and step metadata} per line
    val-00000.jsonl.gz ...       the held-out split (and test-*.jsonl.gz with data.test_fraction), same records
    rejected/rejected-00000.jsonl.gz ...   every dropped document and skipped file, with "reason" (and "duplicate_of")
    report.json                  counts for every step (also the manifest's stats)
    manifest.json                written last: the folder is complete only once it exists
    work/                        while building: the plan and one folder per finished work shard (removed at the end)

How it runs: the inputs are planned into work shards (lmforge/data/plan.py); each shard is processed alone
by a worker process (lmforge/data/process.py), so a killed build resumes at the first unfinished shard and a
cluster can run shards as separate tasks (``task=(i, n)``); the merge (lmforge/data/merge.py) then does what
needs every document at once. Every shard's bytes depend only on the recipe and the inputs, so two builds of
the same data are byte-identical, however many workers or tasks made them. Shards are read back with
``iter_documents``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from lmforge.artifacts import atomic_write_json, fingerprint, is_up_to_date, read_json, read_manifest, write_manifest
from lmforge.config import DataConfig
from lmforge.data.merge import MAX_LISTED_SKIPPED_FILES, SPLITS, merge_shards
from lmforge.data.plan import inputs_fingerprints, path_identities, plan_shards, resolve_sources, units_from_json, units_to_json
from lmforge.data.process import process_shard
from lmforge.errors import LmforgeError

STAGE = "data"
# Level 1: 4x faster than 6 on this corpus (112 against 26 MB/s), files 17% larger. The merge writes every
# shard on one core, so at 6 compression was its largest cost.
GZIP_LEVEL = 1
# Part of the work plan's key: bump it when the steps change what a shard holds, so stale work is discarded.
PIPELINE_VERSION = 2
# Settings that change how the work is divided, never what comes out: left out of the fingerprint.
SCHEDULING_FIELDS = {"workers", "shard_mb"}


def stage_config(config: DataConfig) -> dict:
    """The recipe section as the manifest records it (without the scheduling settings, which change no output byte)."""
    return config.model_dump(mode="json", exclude=SCHEDULING_FIELDS)


def build_corpus(config: DataConfig, out_dir: Path, progress: bool = True, task: tuple[int, int] | None = None,
                 merge_only: bool = False, keep_work: bool = False) -> dict:
    """Build the data folder; returns the report (also report.json and the manifest's stats).

    ``task=(i, n)`` processes only the shards whose index is i modulo n and returns a short summary, so
    n cluster tasks can share the work; ``merge_only`` then checks that every shard is finished and merges.
    Without either, every unfinished shard is processed (by ``config.workers`` processes) and merged.
    Raises LmforgeError when a source does not exist or no document survives the steps.
    """
    started = time.perf_counter()
    sources = resolve_sources(config)
    inputs = all_inputs(config, sources)  # taken before reading, so a file edited meanwhile triggers a rebuild
    out_dir = Path(out_dir)
    work = out_dir / "work"
    if (task is not None or merge_only) and is_up_to_date(out_dir, STAGE, stage_config(config), inputs):
        # Finished already (a task started late, or a second merge): nothing to do, and nothing to undo.
        report = read_manifest(out_dir, STAGE)["stats"]
        return {**report, "up_to_date": True} if merge_only else {"task": task[0], "tasks": task[1], "up_to_date": True}
    plan = load_or_make_plan(config, sources, inputs, out_dir, work)
    shards = units_from_json(plan["shards"])
    shard_dirs = [work / "shards" / f"{index:05d}" for index in range(len(shards))]
    index_path = decontamination_index(config, work)
    if not merge_only:
        mine = [index for index in range(len(shards)) if task is None or index % task[1] == task[0]]
        todo = [index for index in mine if not (shard_dirs[index] / "done.json").exists()]
        text_fields = {source.index: source.text_field for source in sources}
        run_shards(todo, shards, config, text_fields, shard_dirs, index_path, progress)
        if task is not None:
            return {"task": task[0], "tasks": task[1], "shards": len(mine), "processed_now": len(todo),
                    "shards_total": len(shards), "work": str(work)}
    unfinished = [index for index, folder in enumerate(shard_dirs) if not (folder / "done.json").exists()]
    if unfinished:
        listed = ", ".join(map(str, unfinished[:10])) + (" ..." if len(unfinished) > 10 else "")
        raise LmforgeError(f"{len(unfinished)} of {len(shards)} work shards are not finished (shards {listed}); run the "
                           f"missing `--task i --tasks n` jobs (or `lmforge data` without --merge) first")
    dones = [read_json(folder / "done.json", "work shard summary") for folder in shard_dirs]
    clear_outputs(out_dir)

    def writer(folder: Path, prefix: str) -> ShardWriter:
        return ShardWriter(folder, prefix, config.shard_docs)

    merge_started = time.perf_counter()
    report, skipped = merge_shards(shard_dirs, dones, sources, config, out_dir, work, writer, plan["skipped"], progress)
    report["merge_seconds"] = round(time.perf_counter() - merge_started, 3)
    skipped = plan["skipped"] + skipped
    report["files_skipped"] = len(skipped)
    report["files_skipped_by_reason"] = count_reasons(skipped)
    report["skipped_files"] = skipped[:MAX_LISTED_SKIPPED_FILES]
    for split in SPLITS:
        report[f"{split}_shards"] = sorted(path.name for path in out_dir.glob(f"{split}-*.jsonl.gz"))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report = json.loads(json.dumps(report))  # as report.json and the manifest will hold it (string keys)
    if report["kept"] == 0:
        atomic_write_json(out_dir / "report.json", report)
        raise LmforgeError(f"no documents left after filtering: {what_happened(report)}; details in {out_dir / 'report.json'}")
    atomic_write_json(out_dir / "report.json", report)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    write_manifest(out_dir, STAGE, stage_config(config), inputs, report)
    return report


def load_or_make_plan(config: DataConfig, sources, inputs: dict, out_dir: Path, work: Path) -> dict:
    """The work plan: reused when an unfinished build of the same recipe and inputs left one, else made afresh."""
    key = fingerprint(stage_config(config), config.shard_mb, inputs, PIPELINE_VERSION)
    path = work / "plan.json"
    if path.exists():
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            plan = {}
        if plan.get("key") == key:
            return plan
        # Work of another recipe or other inputs. (Only then: cluster tasks that start together all find no
        # plan, and one of them must not delete the shards another has just finished.)
        shutil.rmtree(work, ignore_errors=True)
    if out_dir.exists():
        (out_dir / "manifest.json").unlink(missing_ok=True)
    shards, skipped = plan_shards(sources, int(config.shard_mb * (1 << 20)))
    plan = {"key": key, "shards": units_to_json(shards), "skipped": skipped}
    atomic_write_json(path, plan)
    return plan


def decontamination_index(config: DataConfig, work: Path) -> Path | None:
    """Build the evaluation n-gram index once per build (workers load it); None when the step is off."""
    if not config.decontamination.enabled:
        return None
    path = work / "decontamination.npy"
    if not path.exists():
        from lmforge.data.decontaminate import build_index

        section = config.decontamination
        # Written under a private name and renamed: a killed build or a cluster task racing another never
        # leaves a half-written index behind for the workers to load.
        temp = work / f".decontamination.{uuid.uuid4().hex}.tmp"  # unique across the nodes of a cluster too
        work.mkdir(parents=True, exist_ok=True)
        build_index(section.eval_files, section.eval_field, section.ngram).save(temp)
        os.replace(temp, path)
    return path


def run_shards(todo: list[int], shards, config: DataConfig, text_fields: dict, shard_dirs: list[Path], index_path,
               progress: bool) -> None:
    if not todo:
        return
    workers = min(config.workers or os.cpu_count() or 1, len(todo))
    total_bytes = sum(unit.size for index in todo for unit in shards[index])
    bar = tqdm(total=total_bytes, desc="data: processing shards", unit="B", unit_scale=True, disable=not progress,
               file=sys.stderr, leave=False)
    try:
        if workers == 1:
            for index in todo:
                process_shard(index, shards[index], config, text_fields, shard_dirs[index], index_path, progress)
                bar.update(sum(unit.size for unit in shards[index]))
            return
        # spawn: a clean interpreter per worker (a forked copy of a process that has loaded torch can deadlock)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(process_shard, index, shards[index], config, text_fields, shard_dirs[index], index_path,
                                   False): index for index in todo}
            for future in as_completed(futures):
                future.result()
                bar.update(sum(unit.size for unit in shards[futures[future]]))
    finally:
        bar.close()


def clear_outputs(out_dir: Path) -> None:
    """Remove a previous build's outputs (never the work folder), so no stale shard survives next to new ones."""
    for entry in out_dir.iterdir():
        if entry.name == "work":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def count_reasons(items: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    return dict(sorted(counts.items()))


def data_inputs(config: DataConfig) -> dict[str, str]:
    """Fingerprints of the inputs, one per source, for the manifest and the up-to-date check.

    A file or folder is fingerprinted by (resolved path, size, mtime_ns) of every file found in it;
    a stdlib source by the Python version; evaluation files for decontamination likewise. Raises LmforgeError for a
    source that does not exist.
    """
    return all_inputs(config, resolve_sources(config))


def all_inputs(config: DataConfig, sources) -> dict[str, str]:
    inputs = inputs_fingerprints(sources)
    if config.decontamination.enabled:
        if not config.decontamination.eval_files:
            raise LmforgeError("data.decontamination is enabled but names no eval_files to decontaminate against")
        inputs["decontamination"] = fingerprint(existing_files(config.decontamination.eval_files, "decontamination evaluation file"))
    if config.toxicity.enabled and config.toxicity.word_lists:
        inputs["toxicity"] = fingerprint(existing_files(config.toxicity.word_lists, "toxicity word list"))
    return inputs


def existing_files(paths: list[str], what: str) -> list[tuple[str, int, int]]:
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise LmforgeError(f"{what} not found: {missing[0]}")
    return [identity for path in paths for identity in path_identities(Path(path))]


def iter_documents(data_dir: Path, split: str) -> Iterator[dict]:
    """Yield the records of one split ("train", "val" or "test") of a finished data folder.

    Raises LmforgeError (at the call, not at the first record) if the folder has no manifest.json
    or the split is unknown, and while iterating if a shard is corrupt.
    """
    if split not in SPLITS:
        raise LmforgeError(f"unknown data split `{split}`; expected one of {', '.join(SPLITS)}")
    read_manifest(data_dir, STAGE)
    return iter_shard_records(sorted(Path(data_dir).glob(f"{split}-*.jsonl.gz")))


def iter_rejected(data_dir: Path) -> Iterator[dict]:
    """Yield every record of a data folder's rejected log: dropped documents and skipped files, each with its reason."""
    return iter_shard_records(sorted((Path(data_dir) / "rejected").glob("rejected-*.jsonl.gz")))


def iter_shard_records(shards: list[Path]) -> Iterator[dict]:
    for shard in shards:
        try:
            with gzip.open(shard, "rt", encoding="utf-8") as lines:
                for line in lines:
                    yield json.loads(line)
        except (OSError, EOFError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise LmforgeError(f"corrupt data shard {shard}: {problem}; run `lmforge data` again") from None


def what_happened(report: dict) -> str:
    """A one-line account of where the documents went, for the empty-corpus error."""

    def listing(counts: dict[str, int]) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))

    parts = [f"{report['documents_read']} documents read ({report['documents_after_cutting']} after cutting)"]
    if report["rejected"]:
        parts.append(f"rejected: {listing(report['rejected'])}")
    if report["files_skipped"]:
        parts.append(f"{report['files_read']} files read, skipped: {listing(report['files_skipped_by_reason'])}")
    return "; ".join(parts)


class ShardWriter:
    """Writes records as gzip-compressed JSON lines to ``<folder>/<prefix>-00000.jsonl.gz``, ... with at
    most ``docs_per_shard`` records each. A shard gets its final name only once complete, and its bytes
    depend only on its records (no timestamp or file name in the gzip header). Use it as a context
    manager; on an error the unfinished shard is removed."""

    def __init__(self, folder: Path, prefix: str, docs_per_shard: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.docs_per_shard = docs_per_shard
        self.shard_names: list[str] = []
        self.records_in_shard = 0
        self.temp_path: Path | None = None
        self.raw = None
        self.compressed = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finish_shard()
        elif self.temp_path is not None:
            self.compressed.close()
            self.raw.close()
            self.temp_path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        self.write_line((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def write_line(self, line: bytes) -> None:
        """Write one already-encoded JSON line (ending in a newline)."""
        if self.compressed is None:
            self.start_shard()
        self.compressed.write(line)
        self.records_in_shard += 1
        if self.records_in_shard == self.docs_per_shard:
            self.finish_shard()

    def start_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shard_names):05d}.jsonl.gz"
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        self.temp_path = Path(temp)
        self.raw = os.fdopen(fd, "wb")
        self.compressed = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, compresslevel=GZIP_LEVEL, mtime=0)
        self.shard_names.append(name)

    def finish_shard(self) -> None:
        if self.compressed is None:
            return
        self.compressed.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.temp_path, self.folder / self.shard_names[-1])
        self.compressed = self.raw = self.temp_path = None
        self.records_in_shard = 0
