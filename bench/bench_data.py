"""Throughput of the whole data pipeline at 1 and 2 worker processes on a corpus of 100 MB or more.

    python bench/bench_data.py [--mb 100] [--workers 1,2] [--corpus /tmp/lmforge-bench-corpus]

The corpus is made once (and kept) from real English text: sentences of the pydoc topics, the standard
library's module docstrings and, when ../shared is present, Shakespeare, recombined into distinct documents
of 3-40 sentences, with planted exact copies (3%), near copies (3%, a few words changed) and documents with
e-mail addresses and phone numbers (1%). Files are JSONL (the common case) plus a folder of Markdown files.
No HTML: extraction has its own benchmark (bench/bench_html_extraction.py).

Each run is the default recipe's data section (every default step, near-dedup included) into a fresh
folder. The table gives documents/s and MB/s of input, MB/s per worker, the speed-up over one worker, and
where a single worker's CPU time goes (MB/s per step). Target (issue 6): >= 5 MB/s per worker, and near-
linear scaling with workers.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.config import DataConfig
from lmforge.data.stage import build_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def real_sentences() -> list[str]:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    for module in sorted(name for _, name, _ in pkgutil.iter_modules() if not name.startswith(("_", "test", "idle", "tkinter", "turtle", "this", "antigravity"))):
        try:
            docs = inspect.getdoc(importlib.import_module(module)) or ""
        except Exception:  # some modules cannot be imported here; their docs are not needed
            continue
        texts.append(docs)
    shakespeare = SHARED / "tinyshakespeare.txt"
    if shakespeare.exists():
        texts.append(shakespeare.read_text(encoding="utf-8").replace("\n", " "))
    sentences = []
    for text in texts:
        for sentence in SENTENCE.split(" ".join(text.split())):
            if 6 <= len(sentence.split()) <= 60 and sum(char.isalpha() for char in sentence) > 0.7 * len(sentence):
                sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def make_corpus(folder: Path, megabytes: float, short: bool = False, seed: int = 0) -> Path:
    """Documents of 3-40 sentences, or with ``short`` of 1-3 sentences (about 100-500 bytes), until ``megabytes``."""
    marker = folder / "corpus.info"  # not a source format, so the pipeline skips it
    if marker.exists() and json.loads(marker.read_text()) == {"megabytes": megabytes, "short": short, "seed": seed}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "markdown").mkdir(parents=True)
    rng = random.Random(seed)
    sentences = real_sentences()
    target = int(megabytes * 1e6)
    written = 0
    documents: list[str] = []
    file_index = 0

    def flush() -> None:
        nonlocal documents, file_index
        path = folder / f"part-{file_index:03d}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
        documents, file_index = [], file_index + 1

    markdown = 0
    pool: list[str] = []
    while written < target:
        roll = rng.random()
        if pool and roll < 0.03:
            text = rng.choice(pool)
        elif pool and roll < 0.06:
            words = rng.choice(pool).split()
            for _ in range(max(1, len(words) // 60)):
                words[rng.randrange(len(words))] = "altered"
            text = " ".join(words)
        else:
            shape = (1, 1, 3) if short else (5, 2, 8)  # paragraphs (up to), sentences per paragraph (from, to)
            paragraphs = [" ".join(rng.choice(sentences) for _ in range(rng.randint(shape[1], shape[2])))
                          for _ in range(rng.randint(1, shape[0]))]
            text = "\n\n".join(paragraphs)
            if roll > 0.99:
                text += f"\n\nContact {rng.choice(['ann', 'bob', 'chen'])}.{rng.randint(1, 999)}@example.org or call +1 415 555 {rng.randint(1000, 9999)}."
        if rng.random() < 0.02:
            (folder / "markdown" / f"note-{markdown:05d}.md").write_text(f"# Note {markdown}\n\n*{text}*\n", encoding="utf-8")
            markdown += 1
        else:
            documents.append(text)
        pool.append(text)
        if len(pool) > 4000:  # copies come from the recent past, across file boundaries
            del pool[:2000]
        written += len(text.encode("utf-8"))
        if len(documents) == (50_000 if short else 5000):
            flush()
    if documents:
        flush()
    marker.write_text(json.dumps({"megabytes": megabytes, "short": short, "seed": seed}))
    return folder


def corpus_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.suffix in (".jsonl", ".md"))


def one_build(corpus: str, out: str, workers: int, shard_mb: float, short: bool) -> None:
    """Build the corpus once (a child of main) and print the time and peak memory as the last line."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    config = DataConfig(sources=[corpus], workers=workers, shard_mb=shard_mb)
    if short:  # let short documents through the length and word-count rules, so dedup sees all of them
        config = config.model_copy(update={"min_chars": 0, "quality": config.quality.model_copy(update={"min_words": 3})})
    build_corpus(config, Path(out), progress=False)
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the benchmark's own parent.
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "main_rss_mb": peak, "worker_rss_mb": workers_peak}))


def main() -> None:
    if sys.argv[1:2] == ["--one-build"]:
        return one_build(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6] == "short")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/lmforge-bench-corpus"), help="where the corpus is made and kept")
    parser.add_argument("--shard-mb", type=float, default=DataConfig().shard_mb, help="data.shard_mb (default: the recipe default)")
    parser.add_argument("--short", action="store_true", help="short documents (1-3 sentences; about 1M of them at --mb 300), "
                        "with quality.min_words 3 and min_chars 0 so they reach dedup: the scale check of issue 6")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmforge-bench-data"), help="scratch folder for the outputs")
    args = parser.parse_args()

    started = time.perf_counter()
    corpus = make_corpus(args.corpus, args.mb, args.short)
    size = corpus_bytes(corpus)
    print(f"corpus: {size / 1e6:.1f} MB in {corpus} (made or found in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    rows = []
    first_report = None
    for workers in [int(item) for item in args.workers.split(",")]:
        # Each build in a fresh process, so its peak memory is its own.
        out = args.out / f"workers-{workers}"
        child = subprocess.run([sys.executable, __file__, "--one-build", str(corpus), str(out), str(workers), str(args.shard_mb),
                                "short" if args.short else "normal"],
                               capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.splitlines()[-1])
        report = json.loads((out / "report.json").read_text())
        first_report = first_report or report
        rows.append((workers, result["seconds"], report, result))

    print(f"\n## Data pipeline throughput ({size / 1e6:.0f} MB of JSONL and Markdown, default steps)\n")
    print("| workers | seconds | of which the merge | documents read/s | MB/s | MB/s per worker | speed-up vs the first row | peak RSS MB (main / largest worker) | kept | removed as duplicates |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workers, seconds, report, result in rows:
        removed = report["dedup"]["exact_removed"] + report["dedup"]["near_removed"]
        print(f"| {workers} | {seconds:.1f} | {report['merge_seconds']:.1f} | {report['documents_read'] / seconds:,.0f} | {size / 1e6 / seconds:.2f} | "
              f"{size / 1e6 / seconds / workers:.2f} | {rows[0][1] / seconds:.2f}x | {result['main_rss_mb']:.0f} / "
              f"{result['worker_rss_mb']:.0f} | {report['kept']:,} | {removed:,} |")
    print("\n## Where one worker's CPU time goes\n")
    print("| part | CPU seconds | MB/s of input through it alone |")
    print("| --- | --- | --- |")
    for name, value in sorted(first_report["worker_seconds"].items(), key=lambda item: -item[1]):
        if value > 0:
            print(f"| {name} | {value:.1f} | {size / 1e6 / value:.1f} |")
    print(f"\nsteps' report: {json.dumps({step['step']: step['rejected'] for step in first_report['steps'] if step['rejected']})}")


if __name__ == "__main__":
    main()
