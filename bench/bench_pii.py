"""PII scrubbing: precision and recall per kind on a generated labelled set, and throughput in MB/s.

    python bench/bench_pii.py [--items 5000] [--seed 0] [--megabytes 4] [--repeats 3] [--clock wall|process]

The labelled set (lmforge/data/pii_testset.py) plants e-mail addresses, phone numbers, IPs, card numbers,
IBANs and secrets in many formats among hard negatives (versions, dates, ISBNs, hashes, UUIDs, decorators,
invalid checksums, arithmetic). A planted value counts as found when the scrubber claims exactly its
characters as its kind; precision counts every claimed span. Throughput is measured on documents of about
4 KB, as the pipeline sees them: generated English prose with one PII value every 200 sentences, the
Python standard library's documentation (numbers and symbols everywhere), and, where the system has them,
the licence texts in /usr/share/common-licenses (real English prose). `--clock process` counts CPU
seconds, which other load on the machine does not inflate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.config import PII_KINDS
from lmforge.data.pii import PiiScrubber
from lmforge.data.pii_testset import generate, prose, score, stdlib_documentation

DOCUMENT_CHARS = 4000
DOC_MODULES = ["os", "subprocess", "socket", "string", "textwrap", "json", "csv", "argparse", "logging", "time",
               "calendar", "decimal", "datetime", "re", "collections", "itertools", "typing", "pathlib", "ipaddress",
               "email", "email.utils", "urllib.parse", "uuid", "struct", "hashlib", "statistics", "asyncio", "unittest"]
LICENSES = Path("/usr/share/common-licenses")


def documents(text: str, megabytes: float) -> list[str]:
    """About ``megabytes`` of ``text`` (repeated if shorter) cut into ~4 KB documents at line ends."""
    target = int(megabytes * 1e6)
    text = text * (target // max(1, len(text)) + 1)
    pieces, start = [], 0
    while start < target:
        end = text.find("\n", start + DOCUMENT_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def throughput(scrubber: PiiScrubber, docs: list[str], repeats: int, clock) -> tuple[float, int]:
    """(best MB/s over ``repeats``, placeholders written)."""
    size = sum(len(doc.encode()) for doc in docs)
    best, replaced = float("inf"), 0
    for _ in range(repeats):
        started = clock()
        replaced = sum(sum(scrubber(doc)[1].values()) for doc in docs)
        best = min(best, clock() - started)
    return size / best / 1e6, replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=5000, help="labelled paragraphs to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--megabytes", type=float, default=4.0, help="text per throughput corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = parser.parse_args()
    scrubber = PiiScrubber(PII_KINDS)

    scores, mistakes = score(scrubber, generate(args.items, args.seed))
    print(f"Labelled set: {args.items} paragraphs, seed {args.seed}\n")
    print("| kind | planted | found | claimed | precision | recall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, result in scores.items():
        print(f"| {kind} | {result.planted} | {result.correct} | {result.predicted} | {result.precision:.4f} | "
              f"{result.recall:.4f} |")
    shown: dict[tuple[str, str], int] = {}
    for text, (start, end, kind), what in mistakes:  # a few examples of each kind of mistake
        shown[kind, what] = shown.get((kind, what), 0) + 1
        if shown[kind, what] <= 3:
            print(f"  {what} {kind}: {text[start:end]!r} in ...{text[max(0, start - 30):end + 20]!r}...")

    corpora = {"generated prose, rare PII": prose(int(args.megabytes * 1e6), args.seed),
               "stdlib documentation": stdlib_documentation(DOC_MODULES)}
    if LICENSES.is_dir():
        corpora["licence texts (real prose)"] = "\n".join(path.read_text() for path in sorted(LICENSES.iterdir())
                                                          if path.is_file())
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"\nThroughput, ~{DOCUMENT_CHARS // 1000} KB documents, best of {args.repeats}, {args.clock} clock\n")
    print("| corpus | documents | MB | placeholders | MB/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, text in corpora.items():
        docs = documents(text, args.megabytes)
        megabytes_per_second, replaced = throughput(scrubber, docs, args.repeats, clock)
        size = sum(len(doc.encode()) for doc in docs) / 1e6
        print(f"| {name} | {len(docs)} | {size:.1f} | {replaced} | {megabytes_per_second:.1f} |")


if __name__ == "__main__":
    main()
