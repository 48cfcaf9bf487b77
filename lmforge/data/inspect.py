"""`lmforge data inspect`: a data folder's report as tables, sample documents per rejection reason, and a data card.

It reads only what `lmforge data` wrote (manifest.json, report.json and the shards). Samples come from one
streaming pass over the shards with a fixed-size reservoir per reason, so memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import gzip
import html
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.artifacts import read_json, read_manifest
from lmforge.data.merge import SPLITS
from lmforge.errors import LmforgeError

KEPT = "kept"
TOP_LANGUAGES = 10
TOP_REASONS_IN_TERMINAL = 3
LISTED_SKIPPED_FILES = 10
LISTED_CLUSTERS = 5
ELLIPSIS = "…"
# Characters that would move the cursor, ring the bell or reorder a terminal line: shown as escapes instead.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
NEWLINE_OR_TAB = re.compile("[\n\t]")
NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

DESCRIPTION = """Show what a data folder holds and what each step of `lmforge data` removed: the report as tables,
random kept and rejected documents for every rejection reason, and optionally a data card (Markdown or HTML)."""
EPILOG = """Examples:
  lmforge data inspect runs/default                          tables and 3 samples per reason
  lmforge data inspect runs/default --reason too_short --samples 10
  lmforge data inspect runs/default/data --card card.html    also writes card-lengths.png next to it
  lmforge data inspect runs/default --rejected-only --json   samples as JSON lines, for scripts"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a run folder (its data/ folder is read) or a data folder")
    parser.add_argument("--samples", type=non_negative_int, default=3, metavar="K",
                        help="random documents shown per rejection reason, and kept documents (default: 3; 0 shows none)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random samples (default: 0); the same seed shows the same documents")
    parser.add_argument("--chars", type=non_negative_int, default=300, metavar="N",
                        help="cut each sample text to N characters, with an ellipsis (default: 300; 0 keeps whole texts)")
    parser.add_argument("--reason", action="append", default=[], metavar="R",
                        help="sample only documents rejected for reason R (repeatable; e.g. too_short, duplicate); "
                             "leaves out kept documents")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--kept-only", action="store_true", help="sample only kept documents (from every split)")
    only.add_argument("--rejected-only", action="store_true", help="sample only rejected documents and skipped files")
    parser.add_argument("--card", type=Path, metavar="PATH",
                        help="write a data card: PATH ending in .md is Markdown, .html a self-contained page; the length "
                             "histogram goes next to it as <stem>-lengths.png")
    parser.add_argument("--json", action="store_true",
                        help="print the samples as JSON lines (one object per document, with \"kind\": kept or rejected) "
                             "instead of tables")
    return parser


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def inspect_main(argv: list[str], prog: str) -> int:
    """Run `lmforge data inspect` (the CLI turns an LmforgeError into a one-line error and exit status 2)."""
    return run_inspect(build_parser(prog).parse_args(argv))


def run_inspect(args: argparse.Namespace) -> int:
    if args.card is not None and args.card.suffix.lower() not in (".md", ".html", ".htm"):
        raise LmforgeError(f"--card {args.card}: the name must end in .md (Markdown) or .html (a web page)")
    data_dir = find_data_folder(args.folder)
    report, manifest = load_folder(data_dir)
    want_kept, reasons = sample_plan(report, args)
    samples = sample_documents(data_dir, want_kept, reasons, args.samples, args.seed) if args.samples else {}
    if args.json:
        for line in sample_json_lines(samples, args.chars):
            print(line)
    else:
        print(report_text(data_dir, report))
        if samples:
            print()
            print(samples_text(samples, args.samples, args.seed, args.chars))
    if args.card is not None:
        written = write_card(args.card, data_dir, report, manifest, samples, args.chars)
        print(f"card: {' and '.join(map(str, written))}", file=sys.stderr if args.json else sys.stdout)
    return 0


def find_data_folder(path: Path) -> Path:
    """The data folder itself, or RUN/data for a run folder."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"no such folder: {path}")
    if not path.is_dir():
        raise LmforgeError(f"{path} is not a folder; give a run folder or its data/ folder")
    if not (path / "manifest.json").exists() and (path / "data").is_dir():
        return path / "data"
    return path


def load_folder(data_dir: Path) -> tuple[dict, dict]:
    """(report, manifest) of a finished data folder, or a one-line error saying what is missing."""
    manifest = read_manifest(data_dir, "data")
    if manifest.get("stage") != "data":
        raise LmforgeError(f"{data_dir} holds the `{manifest.get('stage')}` stage, not a data folder")
    report = read_json(data_dir / "report.json", "data report")
    if not isinstance(report, dict):
        raise LmforgeError(f"{data_dir / 'report.json'} is not a data report; run `lmforge data` again")
    missing = [key for key in ("steps", "kept", "rejected") if key not in report]
    if missing:
        raise LmforgeError(f"{data_dir / 'report.json'} lacks {', '.join(missing)}; run `lmforge data` again")
    return report, manifest


def rejection_reasons(report: dict) -> dict[str, int]:
    """Every reason a document was rejected or a file skipped, with its count."""
    reasons = dict(report.get("rejected", {}))
    for reason, count in report.get("files_skipped_by_reason", {}).items():
        reasons[reason] = reasons.get(reason, 0) + count
    return {reason: count for reason, count in sorted(reasons.items()) if count}


def sample_plan(report: dict, args: argparse.Namespace) -> tuple[bool, set[str] | None]:
    """Whether to sample kept documents, and which rejection reasons (None: all of them)."""
    known = rejection_reasons(report)
    for reason in args.reason:
        if reason not in known:
            close = difflib.get_close_matches(reason, known, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise LmforgeError(f"no document in this folder was rejected as `{reason}`; {hint}"
                               f"reasons here: {', '.join(known) or 'none'}")
    if args.reason and args.kept_only:
        raise LmforgeError("--reason picks rejected documents; it cannot go with --kept-only")
    if args.kept_only:
        return True, set()
    want_kept = not (args.rejected_only or args.reason)
    return want_kept, set(args.reason) or None


class Reservoir:
    """A uniform random sample of k items from a stream of unknown length (Algorithm R), in O(k) memory."""

    def __init__(self, k: int, rng: random.Random):
        self.k, self.rng = k, rng
        self.seen = 0
        self.items: list = []

    def offer(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.k:
            self.items[slot] = item


@dataclass
class Samples:
    """The documents sampled for one category (kept, or one rejection reason) and how many there were."""

    documents: list[dict]
    total: int


def sample_documents(data_dir: Path, want_kept: bool, reasons: set[str] | None, k: int, seed: int) -> dict[str, Samples]:
    """k random documents per category ("kept" and each rejection reason), in reading order.

    Each category has its own random stream (from the seed and its name), so filtering by reason does not change
    which documents a reason shows. Kept documents are drawn from the shards as written (a document that a mix
    weight repeats counts once per copy) and carry "split".
    """
    reservoirs: dict[str, Reservoir] = {}

    def reservoir(category: str) -> Reservoir:
        if category not in reservoirs:
            reservoirs[category] = Reservoir(k, random.Random(f"{seed}/{category}"))
        return reservoirs[category]

    position = 0
    if want_kept:
        for split in SPLITS:
            for line in shard_lines(sorted(data_dir.glob(f"{split}-*.jsonl.gz"))):
                # Kept lines stay undecoded until chosen: parsing every document would dominate the pass.
                reservoir(KEPT).offer((position, split, line))
                position += 1
    if reasons is None or reasons:
        for line in shard_lines(sorted((data_dir / "rejected").glob("rejected-*.jsonl.gz"))):
            record = parse_record(line)
            reason = str(record.get("reason", "unknown"))
            if reasons is None or reason in reasons:
                reservoir(reason).offer((position, None, record))
            position += 1
    samples = {}
    for category in sorted(reservoirs, key=lambda name: (name != KEPT, name)):
        chosen = sorted(reservoirs[category].items, key=lambda item: item[0])
        documents = []
        for _, split, record in chosen:
            if split is not None:
                record = {**parse_record(record), "split": split}
            documents.append(record)
        samples[category] = Samples(documents, reservoirs[category].seen)
    return samples


def shard_lines(shards: list[Path]):
    for shard in shards:
        try:
            with gzip.open(shard, "rb") as lines:
                yield from lines
        except (OSError, EOFError) as exc:
            raise LmforgeError(f"corrupt data shard {shard}: {type(exc).__name__}: {exc}; run `lmforge data` again") from None


def parse_record(line: bytes) -> dict:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise LmforgeError(f"a data shard holds a line that is not JSON ({exc}); run `lmforge data` again") from None
    return record if isinstance(record, dict) else {"text": str(record)}


def excerpt(text: str, chars: int, keep_newlines: bool = False) -> str:
    """The text cut to ``chars`` characters (0: whole) with an ellipsis, control characters written as escapes."""
    text = str(text)
    if chars and len(text) > chars:
        text = text[:chars].rstrip() + ELLIPSIS
    text = CONTROL_CHARACTERS.sub(escape_character, text)
    return text if keep_newlines else NEWLINE_OR_TAB.sub(escape_character, text)


def sample_text(document: dict, chars: int, keep_newlines: bool = False) -> str:
    return excerpt(document.get("text") or "", chars, keep_newlines) or "(no text)"


def escape_character(match: re.Match) -> str:
    character = match.group()
    return NAMED_ESCAPES.get(character) or (f"\\x{ord(character):02x}" if ord(character) < 0x100 else f"\\u{ord(character):04x}")


class Percent(float):
    """A share in percent, written as 12.5%."""


@dataclass
class Table:
    """Rows of cells; numbers are right-aligned and written with thousands separators, None as a dash."""

    headers: list[str]
    rows: list[list]

    def cells(self) -> list[list[str]]:
        return [[cell_text(cell) for cell in row] for row in self.rows]

    def numeric(self, column: int) -> bool:
        return all(isinstance(row[column], (int, float)) or row[column] is None for row in self.rows)


def cell_text(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, Percent):
        return f"{cell:.1f}%"
    if isinstance(cell, int):
        return f"{cell:,}"
    if isinstance(cell, float):
        return f"{cell:,.2f}"
    return str(cell)


def counts_text(counts: dict[str, int], limit: int | None = None) -> str:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{name} {count:,}" for name, count in ordered[:limit])
    return shown + (f", +{len(ordered) - limit} more" if limit is not None and len(ordered) > limit else "")


def megabytes(size: int | None) -> float | None:
    return None if size is None else size / 1e6


def steps_table(report: dict, reasons_limit: int | None) -> Table:
    rows = []
    for step in report["steps"]:
        rows.append([step["step"], step.get("documents_in"), step.get("documents_out"), sum(step.get("rejected", {}).values()),
                     megabytes(step.get("bytes_in")), megabytes(step.get("bytes_out")),
                     counts_text(step.get("rejected", {}), reasons_limit), counts_text(step.get("changed", {}), reasons_limit)])
    return Table(["step", "in", "out", "rejected", "MB in", "MB out", "reasons", "changes"], rows)


def overview_table(report: dict) -> Table:
    rows = [["files read", report.get("files_read")], ["files skipped", report.get("files_skipped")],
            ["documents read", report.get("documents_read")], ["documents after cutting", report.get("documents_after_cutting")],
            ["rejected", report.get("rejected_total")], ["kept", report["kept"]]]
    return Table(["", "count"], rows)


def skipped_tables(report: dict) -> tuple[Table, Table]:
    by_reason = Table(["reason", "files"], [list(item) for item in report.get("files_skipped_by_reason", {}).items()])
    listed = [[item.get("path"), item.get("reason"), excerpt(item.get("detail") or "", 120)]
              for item in report.get("skipped_files", [])[:LISTED_SKIPPED_FILES]]
    return by_reason, Table(["file", "reason", "detail"], listed)


def splits_table(report: dict, data_dir: Path) -> Table:
    rows = []
    for split in SPLITS:
        shards = sorted(data_dir.glob(f"{split}-*.jsonl.gz"))
        if not shards and not report.get(f"{split}_documents"):
            continue
        rows.append([split, report.get(f"{split}_documents"), report.get(f"{split}_chars"), len(shards),
                     sum(shard.stat().st_size for shard in shards)])
    return Table(["split", "documents", "chars", "shards", "bytes on disk (gzip)"], rows)


def mix_table(report: dict) -> Table:
    rows = [[row.get("source"), row.get("weight"), row.get("documents"), row.get("chars"), row.get("train_documents_written"),
             row.get("train_chars_written"), Percent(100 * row.get("train_share", 0))] for row in report.get("mix", [])]
    return Table(["source", "weight", "documents", "chars", "train docs written", "train chars written", "train share"], rows)


def languages_table(report: dict, top: int = TOP_LANGUAGES) -> Table:
    languages = report.get("languages", {})
    total = sum(languages.values()) or 1
    ordered = sorted(languages.items(), key=lambda item: (-item[1], item[0]))
    rows = [[code or "(not identified)", count, Percent(100 * count / total)] for code, count in ordered[:top]]
    rest = sum(count for _, count in ordered[top:])
    if rest:
        rows.append([f"{len(ordered) - top} others", rest, Percent(100 * rest / total)])
    return Table(["language", "documents", "share"], rows)


def dedup_summary(report: dict) -> str:
    dedup = report.get("dedup", {})
    clusters = dedup.get("clusters", {})
    sizes = ", ".join(f"{count:,} of size {size}" for size, count in sorted(clusters.get("size_histogram", {}).items(),
                                                                           key=lambda item: int(item[0])))
    return (f"exact duplicates removed: {dedup.get('exact_removed', 0):,}; "
            f"near duplicates removed: {dedup.get('near_removed', 0):,}; "
            f"duplicate clusters (more than one document): {clusters.get('clusters', 0):,}" + (f" ({sizes})" if sizes else ""))


def clusters_table(report: dict, limit: int = LISTED_CLUSTERS) -> Table:
    largest = report.get("dedup", {}).get("clusters", {}).get("largest", [])
    return Table(["kept document", "size", "members (first 5)"],
                 [[item.get("keeper"), item.get("size"), ", ".join(map(str, item.get("members", [])))]
                  for item in largest[:limit]])


def accounting_line(report: dict) -> str:
    """Whether every document after cutting is either kept or rejected with a reason (the report must add up)."""
    after_cutting, kept, rejected = report.get("documents_after_cutting"), report["kept"], report.get("rejected_total")
    if after_cutting is None or rejected is None:
        return ""
    if kept + rejected == after_cutting:
        return f"kept {kept:,} + rejected {rejected:,} = {after_cutting:,} documents after cutting: each one accounted for"
    return f"WARNING: kept {kept:,} + rejected {rejected:,} != {after_cutting:,} documents after cutting"


def text_table(table: Table, indent: str = "  ") -> str:
    cells = table.cells()
    widths = [max(len(header), *(len(row[column]) for row in cells)) for column, header in enumerate(table.headers)]
    right = [table.numeric(column) for column in range(len(table.headers))]

    def line(values: list[str]) -> str:
        padded = [value.rjust(width) if is_right else value.ljust(width) for value, width, is_right in zip(values, widths, right)]
        return (indent + "  ".join(padded)).rstrip()

    return "\n".join([line(table.headers), line(["-" * width for width in widths]), *map(line, cells)])


def report_text(data_dir: Path, report: dict) -> str:
    """The report as plain-text tables for the terminal."""
    seconds = report.get("seconds")
    parts = [f"data folder {data_dir}" + (f" (built in {seconds:,.1f} s)" if isinstance(seconds, (int, float)) else ""),
             "sources: " + ", ".join(map(str, report.get("sources", []))), text_table(overview_table(report)),
             accounting_line(report), "", "steps", text_table(steps_table(report, TOP_REASONS_IN_TERMINAL))]
    by_reason, listed = skipped_tables(report)
    if by_reason.rows:
        parts += ["", "files skipped", text_table(by_reason), text_table(listed)]
    parts += ["", "splits", text_table(splits_table(report, data_dir))]
    if report.get("mix"):
        parts += ["", "mix", text_table(mix_table(report))]
    if report.get("languages"):
        parts += ["", f"languages (top {TOP_LANGUAGES})", text_table(languages_table(report))]
    parts += ["", "deduplication", "  " + dedup_summary(report)]
    clusters = clusters_table(report)
    if clusters.rows:
        parts.append(text_table(clusters))
    return "\n".join(parts)


def sample_heading(category: str, samples: Samples) -> str:
    kind = "kept documents" if category == KEPT else f"rejected: {category}"
    return f"{kind} ({len(samples.documents)} of {samples.total:,})"


def sample_source_line(document: dict) -> str:
    fields = [f"id {document.get('id')}"]
    if document.get("split"):
        fields.append(f"split {document['split']}")
    if document.get("source") is not None:
        fields.append(f"source {document['source']}")
    for key in ("detail", "duplicate_of", "language", "language_score"):
        if document.get(key) not in (None, ""):
            fields.append(f"{key.replace('_', ' ')} {excerpt(document[key], 200)}")
    if document.get("file_skipped"):
        fields.append("whole file skipped")
    return "; ".join(fields)


def samples_text(samples: dict[str, Samples], k: int, seed: int, chars: int) -> str:
    cut = f", texts cut at {chars:,} characters" if chars else ""
    lines = [f"samples ({k} per reason, seed {seed}{cut})"]
    for category, found in samples.items():
        lines.append(f"  {sample_heading(category, found)}")
        for document in found.documents:
            lines.append(f"    - {sample_source_line(document)}")
            lines.append(f"      {sample_text(document, chars)}")
    return "\n".join(lines)


def sample_json_lines(samples: dict[str, Samples], chars: int) -> list[str]:
    lines = []
    for category, found in samples.items():
        for document in found.documents:
            text = str(document.get("text", ""))
            record = {"kind": KEPT if category == KEPT else "rejected", **document,
                      "text": text[:chars] + ELLIPSIS if chars and len(text) > chars else text}
            lines.append(json.dumps(record, ensure_ascii=False))
    return lines


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Code:
    text: str


@dataclass
class SampleBlock:
    heading: str
    documents: list[dict]
    chars: int


def card_sections(data_dir: Path, report: dict, manifest: dict, samples: dict[str, Samples], chars: int,
                  histogram: Path) -> list[tuple[str, list]]:
    """The card as (title, blocks); a block is a paragraph (str), Table, Image, Code or SampleBlock."""
    by_reason, listed = skipped_tables(report)
    mix = mix_table(report)
    weights = {row.get("source"): row.get("weight") for row in report.get("mix", [])}
    sources = Table(["source", "weight"], [[source, weights.get(source)] for source in report.get("sources", [])])
    sizes = [overview_table(report), accounting_line(report), splits_table(report, data_dir)]
    steps = ["Every step in pipeline order: documents in and out, megabytes of text (not tracked for the global steps), "
             "what it removed and why, and what it changed.", steps_table(report, None)]
    skipped = [by_reason, listed] if by_reason.rows else ["No file was skipped."]
    languages = [languages_table(report)] if report.get("languages") else ["Language identification was off."]
    lengths = [Image(histogram, "kept documents by length in characters")]
    clusters = clusters_table(report, limit=10)
    dedup = [dedup_summary(report)] + ([clusters] if clusters.rows else [])
    sample_blocks = [SampleBlock(sample_heading(category, found), found.documents, chars) for category, found in samples.items()]
    config = manifest.get("config", {})
    recipe = yaml.safe_dump({"data": config}, sort_keys=False, allow_unicode=True)
    return [
        ("Sources", [sources]),
        ("Sizes", sizes),
        ("Steps", steps),
        ("Files skipped", skipped),
        ("Languages", languages),
        ("Document lengths", lengths),
        ("Deduplication", dedup),
        ("Mix", [mix] if mix.rows else ["One source, no weights."]),
        ("Sample documents", sample_blocks or ["No samples were taken (--samples 0)."]),
        ("Recipe", ["The data section of the recipe that built this folder, as manifest.json records it:", Code(recipe)]),
    ]


def write_card(path: Path, data_dir: Path, report: dict, manifest: dict, samples: dict[str, Samples], chars: int) -> list[Path]:
    """Write the data card (Markdown or HTML by the suffix) and its length histogram; returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    histogram = plot_lengths(report.get("length_histogram", {}), path.with_name(f"{path.stem}-lengths.png"))
    sections = card_sections(data_dir, report, manifest, samples, chars, histogram)
    title = f"Data card: {data_dir.resolve().name}"
    subtitle = (f"Built {manifest.get('created_at', '')} from {len(report.get('sources', []))} source(s); "
                f"{report['kept']:,} documents kept; fingerprint {manifest.get('fingerprint', '')}.")
    render = markdown_card if path.suffix.lower() == ".md" else html_card
    try:
        path.write_text(render(title, subtitle, sections), encoding="utf-8")
    except OSError as exc:
        raise LmforgeError(f"cannot write the data card {path}: {exc.strerror}") from None
    return [path, histogram]


def plot_lengths(histogram: dict, out_path: Path) -> Path:
    """A bar chart of kept documents per length bin (the report's log-spaced edges), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; the figure only goes to a file
    import matplotlib.pyplot as plt

    from lmforge.training.metrics import save_figure

    edges, counts = histogram.get("edges", []), histogram.get("counts", [])
    labels = [f"{length_label(low)}-{length_label(high)}" for low, high in zip(edges, edges[1:])]
    figure, axes = plt.subplots(figsize=(8, 3.5), dpi=100)
    axes.bar(range(len(counts)), counts, color="#4c72b0")
    axes.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_xlabel("characters")
    axes.set_ylabel("kept documents")
    axes.set_title("Kept documents by length")
    axes.grid(axis="y", alpha=0.3)
    return save_figure(figure, out_path)


def length_label(chars: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if chars >= size and chars % size == 0:
            return f"{chars // size}{unit}"
    return str(chars)


def markdown_cell(text: str) -> str:
    # A pipe ends a cell and raw HTML would be rendered by most viewers: both are escaped.
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    cells = table.cells()
    rule = ["---:" if table.numeric(column) else "---" for column in range(len(table.headers))]
    rows = [table.headers, rule, *cells]
    return "\n".join("| " + " | ".join(markdown_cell(cell) if index != 1 else cell for cell in row) + " |"
                     for index, row in enumerate(rows))


def markdown_fence(text: str) -> str:
    """A code fence longer than any run of backticks in the text, so the text cannot close it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)


def markdown_card(title: str, subtitle: str, sections: list[tuple[str, list]]) -> str:
    lines = [f"# {markdown_cell(title)}", "", markdown_cell(subtitle), ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines.append(markdown_table(block) if block.rows else "(none)")
            elif isinstance(block, Image):
                lines.append(f"![{block.alt}]({block.path.name})")
            elif isinstance(block, Code):
                fence = markdown_fence(block.text)
                lines += [f"{fence}yaml", block.text.rstrip("\n"), fence]
            elif isinstance(block, SampleBlock):
                lines += [f"### {markdown_cell(block.heading)}", ""]
                for document in block.documents:
                    text = sample_text(document, block.chars, keep_newlines=True)
                    fence = markdown_fence(text)
                    lines += [f"- {markdown_cell(sample_source_line(document))}", "", fence, text, fence, ""]
            elif block:
                lines.append(markdown_cell(block))
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:.25em .6em;vertical-align:top}
th{background:#f2f2f2}td.number{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.6em;white-space:pre-wrap;word-break:break-word}
.document{margin:.4em 0 1em}.meta{color:#555;font-size:.9em}img{max-width:100%}"""


def html_table(table: Table) -> str:
    if not table.rows:
        return "<p>(none)</p>"
    numeric = [table.numeric(column) for column in range(len(table.headers))]
    head = "".join(f"<th>{html.escape(header)}</th>" for header in table.headers)
    opening = ['<td class="number">' if is_numeric else "<td>" for is_numeric in numeric]
    body = "".join("<tr>" + "".join(f"{opening[column]}{html.escape(cell)}</td>" for column, cell in enumerate(row)) + "</tr>"
                   for row in table.cells())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_card(title: str, subtitle: str, sections: list[tuple[str, list]]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
             f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(subtitle)}</p>"]
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, Table):
                parts.append(html_table(block))
            elif isinstance(block, Image):
                # Embedded, so the page stays whole when copied alone; the PNG next to it is for other uses.
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
            elif isinstance(block, Code):
                parts.append(f"<pre>{html.escape(block.text)}</pre>")
            elif isinstance(block, SampleBlock):
                parts.append(f"<h3>{html.escape(block.heading)}</h3>")
                for document in block.documents:
                    text = sample_text(document, block.chars, keep_newlines=True)
                    parts.append(f'<div class="document"><div class="meta">{html.escape(sample_source_line(document))}</div>'
                                 f"<pre>{html.escape(text)}</pre></div>")
            elif block:
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
