"""Processing one work shard: read its inputs, then run every per-document step and keep what survives.

The steps, in order (each on/off in the recipe, each counting documents and bytes in and out, rejections by
reason with example ids, and changes made):

    read -> extract -> normalize -> cut -> length -> language -> quality -> toxicity -> decontamination -> pii

Global steps (exact and near-duplicate removal, split, mixing) need every shard and run in the merge
(lmforge/data/merge.py). A shard's folder holds::

    docs.jsonl          the surviving documents, one JSON object per line, in reading order (uncompressed: the merge
                        reads them once, and compressing twice cost more CPU than any other part of the merge)
    rejected.jsonl      every document dropped here, with "reason" (and "detail"), and every skipped file
    dedup.npz           per surviving document: exact-dedup key, split hashes, source index, chars, language
    signatures.npy      per surviving document: its MinHash signature (num_perm uint32; no columns without near-dedup)
    done.json           the shard's counts; written last, so a shard is finished exactly when it exists

Everything in the folder depends only on the shard's inputs and the recipe, which is what makes a
resumed build (or one made of cluster tasks) byte-identical to a build in one go.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.artifacts import atomic_write_json
from lmforge.config import DataConfig
from lmforge.data.clean import clean_text, cut_into_pieces, rejection_reason
from lmforge.data.plan import Unit
from lmforge.data.readers import RawDocument, ReadOptions, SkippedFile, read_documents

BATCH_PIECES = 256  # pieces judged together: language identification and MinHash run faster on batches
STEPS = ("read", "extract", "normalize", "cut", "length", "language", "quality", "toxicity", "decontamination", "pii")
GLOBAL_STEPS = ("exact_dedup", "near_dedup", "split", "mix")
EXAMPLES_PER_REASON = 3


@dataclass
class StepStats:
    """What one step saw: documents and UTF-8 bytes in and out, rejections by reason (with a few example ids), changes."""

    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0  # CPU time of the step in its worker (summed over workers), to show where the time goes

    def reject(self, reason: str, doc_id: str) -> None:
        self.rejected[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(doc_id)

    def to_json(self) -> dict:
        return {"documents_in": self.documents_in, "documents_out": self.documents_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "rejected": dict(sorted(self.rejected.items())),
                "changed": dict(sorted(self.changed.items())), "examples": dict(sorted(self.examples.items())),
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_json(cls, data: dict) -> "StepStats":
        return cls(data["documents_in"], data["documents_out"], data["bytes_in"], data["bytes_out"], Counter(data["rejected"]),
                   Counter(data["changed"]), {reason: list(ids) for reason, ids in data["examples"].items()}, data.get("seconds", 0.0))

    def add(self, other: "StepStats") -> None:
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.rejected.update(other.rejected)
        self.changed.update(other.changed)
        for reason, ids in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ids[: EXAMPLES_PER_REASON - len(mine)])


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


@dataclass
class Piece:
    """A document on its way through the steps, with the metadata they add."""

    id: str
    text: str
    raw: RawDocument
    meta: dict = field(default_factory=dict)


class DocumentSteps:
    """The per-document steps of a recipe, built once per worker process."""

    def __init__(self, config: DataConfig, decontamination_index: Path | None):
        from lmforge.data.dedup import MinHasher
        from lmforge.data.extract import strip_markup

        self.config = config
        self.stats = {name: StepStats() for name in STEPS}
        self.strip_markup = strip_markup if config.extraction.strip_markup else None
        self.normalizer = self.language = self.quality = self.toxicity = self.contamination = self.pii = None
        if config.normalize.enabled:
            from lmforge.data.normalize import Normalizer

            self.normalizer = Normalizer(config.normalize)
        if config.language.enabled:
            from lmforge.data.language import LanguageFilter

            self.language = LanguageFilter(config.language)
        if config.quality.enabled:
            from lmforge.data.quality import QualityFilter

            self.quality = QualityFilter(config.quality)
        if config.toxicity.enabled:
            from lmforge.data.toxicity import WordListFilter

            self.toxicity = WordListFilter(config.toxicity)
        if decontamination_index is not None:
            from lmforge.data.decontaminate import NGramIndex

            self.contamination = NGramIndex.load(decontamination_index)
        if config.pii.enabled and config.pii.kinds:
            from lmforge.data.pii import PiiScrubber

            self.pii = PiiScrubber(config.pii.kinds)
        dedup = config.dedup
        self.minhasher = MinHasher(dedup.num_perm, dedup.shingle_words, dedup.seed) if dedup.near else None

    def prepare(self, raw: RawDocument, reject) -> list[Piece]:
        """Read, extract, normalize and cut one document into pieces; ``reject(piece, reason, detail)`` gets a record
        that holds no usable document."""
        read = self.stats["read"]
        read.documents_in += 1
        size = utf8_size(raw.text)
        read.bytes_in += size
        if raw.replaced_bytes:
            read.changed["invalid_utf8_replaced_bytes"] += raw.replaced_bytes
        if raw.rejected_because:
            read.reject(raw.rejected_because, raw.id)
            reject(Piece(raw.id, raw.text, raw), raw.rejected_because, raw.detail or "")
            return []
        read.documents_out += 1
        read.bytes_out += size
        started = time.process_time()
        text = self._extract(raw)
        self.stats["extract"].seconds += time.process_time() - started
        started = time.process_time()
        text = self._normalize(text)
        self.stats["normalize"].seconds += time.process_time() - started
        started = time.process_time()
        cut = self.stats["cut"]
        cut.documents_in += 1
        cut.bytes_in += utf8_size(text)
        pieces = cut_into_pieces(text, self.config.max_doc_chars)
        cut.documents_out += len(pieces)
        cut.bytes_out += sum(map(utf8_size, pieces))
        if len(pieces) > 1:
            cut.changed["documents_cut"] += 1
        cut.seconds += time.process_time() - started
        return [Piece(f"{raw.id}#{index}", text, raw) for index, text in enumerate(pieces)]

    def filter(self, pieces: list[Piece], reject) -> list[Piece]:
        """Run pieces (of any documents, in reading order) through length, language, quality, toxicity,
        decontamination and PII; the survivors, in order. Language is judged for the whole batch at once, which
        is 1.7x faster than one piece at a time."""
        pieces = self._step("length", pieces, reject, self._length)
        verdicts = iter(())
        if self.language is not None:
            started = time.process_time()
            verdicts = iter(self.language.batch([piece.text for piece in pieces]))
            self.stats["language"].seconds += time.process_time() - started
        pieces = self._step("language", pieces, reject, lambda piece, step: self._language(piece, step, verdicts))
        for name, check in (("quality", self._quality), ("toxicity", self._toxicity),
                            ("decontamination", self._decontaminate), ("pii", self._scrub)):
            pieces = self._step(name, pieces, reject, check)
        return pieces

    def _step(self, name: str, pieces: list[Piece], reject, check) -> list[Piece]:
        step = self.stats[name]
        survivors = []
        for piece in pieces:
            step.documents_in += 1
            step.bytes_in += utf8_size(piece.text)
            started = time.process_time()
            reason = check(piece, step)
            step.seconds += time.process_time() - started
            if reason:
                step.reject(reason, piece.id)
                reject(piece, reason, "")
            else:
                step.documents_out += 1
                step.bytes_out += utf8_size(piece.text)
                survivors.append(piece)
        return survivors

    def _extract(self, raw: RawDocument) -> str:
        step = self.stats["extract"]
        step.documents_in += 1
        step.bytes_in += utf8_size(raw.text)
        text = raw.text
        if self.strip_markup is not None and raw.kind in ("markdown", "rst"):
            text = self.strip_markup(text, raw.kind)
            step.changed[f"{raw.kind}_stripped"] += 1
        step.documents_out += 1
        step.bytes_out += utf8_size(text)
        return text

    def _normalize(self, text: str) -> str:
        step = self.stats["normalize"]
        step.documents_in += 1
        step.bytes_in += utf8_size(text)
        if self.normalizer is not None:  # before clean_text, whose removal of C1 controls would break repairable mojibake
            text, changes = self.normalizer(text)
            step.changed.update(changes)
        text = clean_text(text)
        step.documents_out += 1
        step.bytes_out += utf8_size(text)
        return text

    def _length(self, piece: Piece, step: StepStats) -> str | None:
        return rejection_reason(piece.text, self.config.min_chars)

    def _language(self, piece: Piece, step: StepStats, verdicts: Iterator) -> str | None:
        if self.language is None:
            return None
        reason, language, score = next(verdicts)
        piece.meta["language"], piece.meta["language_score"] = language, round(float(score), 4)
        step.changed[f"language:{language}"] += 1
        return reason

    def _quality(self, piece: Piece, step: StepStats) -> str | None:
        if self.quality is None:
            return None
        text, reason, lines_removed = self.quality(piece.text, piece.meta.get("language"))
        if lines_removed and not reason:
            step.changed["boilerplate_lines_removed"] += lines_removed
            step.changed["documents_with_lines_removed"] += 1
            piece.text = text
        return reason

    def _toxicity(self, piece: Piece, step: StepStats) -> str | None:
        if self.toxicity is None:
            return None
        reason, hits = self.toxicity(piece.text)
        if hits and not reason:
            step.changed["documents_with_listed_words_kept"] += 1
        return reason

    def _decontaminate(self, piece: Piece, step: StepStats) -> str | None:
        if self.contamination is None:
            return None
        shared = self.contamination.match(piece.text)
        if shared is not None:
            piece.meta["contamination"] = shared
            return "contaminated"
        return None

    def _scrub(self, piece: Piece, step: StepStats) -> str | None:
        if self.pii is None:
            return None
        text, counts = self.pii(piece.text)
        if counts:
            piece.text = text
            piece.meta["pii"] = dict(sorted(counts.items()))
            step.changed.update({f"pii_{kind}": count for kind, count in counts.items()})
            step.changed["documents_scrubbed"] += 1
        return None


_STEPS_CACHE: dict[str, DocumentSteps] = {}


def steps_for(config: DataConfig, decontamination_index: Path | None) -> DocumentSteps:
    """The steps of this recipe, built once per process (loading models and lists is not free), with fresh counts."""
    from lmforge.data.plan import path_identities

    loaded = [decontamination_index] if decontamination_index else []
    loaded += [Path(path) for path in config.toxicity.word_lists] if config.toxicity.enabled else []
    # Keyed by the files' identities too: a list edited between two builds in one process is read again.
    key = json.dumps([config.model_dump(mode="json"), [path_identities(path) for path in loaded]], sort_keys=True)
    if key not in _STEPS_CACHE:
        _STEPS_CACHE.clear()
        _STEPS_CACHE[key] = DocumentSteps(config, decontamination_index)
    steps = _STEPS_CACHE[key]
    steps.stats = {name: StepStats() for name in STEPS}
    return steps


def iter_unit_documents(unit: Unit, options: ReadOptions, failed_modules: list[dict], progress: bool) -> Iterator[RawDocument]:
    """The raw documents of one unit; raises SkippedFile for a file that cannot be read at all. Stdlib modules whose
    import killed or hung the worker are appended to ``failed_modules`` ({"module", "error"})."""
    if unit.kind == "stdlib":
        from lmforge.data.stdlib_docs import module_documents, topic_documents

        if unit.path == "topics":
            yield from topic_documents()
        else:
            documents, failed = module_documents(progress)
            failed_modules.extend(failed)
            yield from documents
        return
    yield from read_documents(Path(unit.path), unit.doc_id, options)


def read_options(config: DataConfig, text_field: str) -> ReadOptions:
    return ReadOptions(text_field=text_field, html_method=config.extraction.html, max_line_bytes=config.max_line_bytes,
                       max_file_bytes=config.max_file_bytes)


def split_hash(text: str) -> tuple[int, int]:
    """Two independent uniform 64-bit numbers from the text: where it falls in the split, and in the mix's subsampling."""
    digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")


def process_shard(index: int, units: list[Unit], config: DataConfig, text_fields: dict[int, str], folder: Path,
                  decontamination_index: Path | None, progress: bool = False) -> dict:
    """Process one shard into ``folder`` (replaced whole); returns its done.json content."""
    from lmforge.data.dedup import exact_keys

    temp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    steps = steps_for(config, decontamination_index)
    keys: list[bytes] = []
    signatures: list[np.ndarray] = []
    hashes: list[tuple[int, int]] = []
    sources: list[int] = []
    chars: list[int] = []
    languages: list[str] = []
    files = {"read": 0, "skipped": [], "stdlib_modules_failed": []}
    timings: Counter = Counter()

    with open(temp / "docs.jsonl", "wb") as kept, open(temp / "rejected.jsonl", "wb") as rejected:
        def reject(piece: Piece, reason: str, detail: str) -> None:
            record = {"id": piece.id, "text": piece.text, "source": piece.raw.source, "reason": reason, **provenance(piece.raw)}
            if detail:
                record["detail"] = detail
            if piece.meta:
                record.update(piece.meta)
            rejected.write(json_line(record))

        def keep(pieces: list[Piece], source: int) -> None:
            """Filter a batch of pieces of one unit and write the survivors with their dedup keys."""
            survivors = steps.filter(pieces, reject)
            pieces.clear()
            started = time.process_time()
            for piece in survivors:
                record = {"id": piece.id, "text": piece.text, "source": piece.raw.source, "chars": len(piece.text),
                          **provenance(piece.raw), **piece.meta}
                kept.write(json_line(record))
                hashes.append(split_hash(piece.text))
                sources.append(source)
                chars.append(len(piece.text))
                languages.append(piece.meta.get("language", ""))
            written = time.process_time()
            texts = [piece.text for piece in survivors]
            keys.extend(exact_keys(texts))
            if steps.minhasher is not None and texts:
                signatures.append(steps.minhasher.batch(texts))
            timings["write"] += written - started
            timings["dedup_signatures"] += time.process_time() - written

        for unit in units:
            batch: list[Piece] = []
            try:
                documents = iter_unit_documents(unit, read_options(config, text_fields[unit.source]), files["stdlib_modules_failed"], progress)
                for raw in timed(documents, steps.stats["read"]):
                    batch.extend(steps.prepare(raw, reject))
                    if len(batch) >= BATCH_PIECES:
                        keep(batch, unit.source)
                keep(batch, unit.source)
            except SkippedFile as skipped:  # readers raise it before a file yields anything; keep whatever came anyway
                keep(batch, unit.source)
                files["skipped"].append({"path": unit.path, "reason": skipped.reason, "detail": skipped.detail})
                rejected.write(json_line({"id": unit.doc_id, "text": "", "source": unit.path, "reason": skipped.reason,
                                          "detail": skipped.detail, "file_skipped": True}))
                continue
            files["read"] += 1
    num_perm = config.dedup.num_perm if steps.minhasher is not None else 0
    np.save(temp / "signatures.npy", np.concatenate(signatures) if signatures else np.zeros((0, num_perm), np.uint32))
    np.savez(temp / "dedup.npz",
             keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16),
             hashes=np.array(hashes, dtype=np.uint64).reshape(len(hashes), 2),
             sources=np.array(sources, dtype=np.int32), chars=np.array(chars, dtype=np.int64),
             languages=np.array(languages, dtype="<U8"))
    done = {"shard": index, "documents": len(keys), "files": files, "seconds": {k: round(v, 3) for k, v in sorted(timings.items())}, "steps": {name: stats.to_json() for name, stats in steps.stats.items()}}
    atomic_write_json(temp / "done.json", done)
    shutil.rmtree(folder, ignore_errors=True)
    temp.rename(folder)
    return done


def timed(items: Iterator, stats: StepStats) -> Iterator:
    """``items``, adding the CPU time spent producing each one to ``stats.seconds``."""
    while True:
        started = time.process_time()
        try:
            item = next(items)
        except StopIteration:
            stats.seconds += time.process_time() - started
            return
        stats.seconds += time.process_time() - started
        yield item


def provenance(raw: RawDocument) -> dict:
    found = {}
    if raw.offset is not None:
        found["offset"] = raw.offset
    if raw.row is not None:
        found["row"] = raw.row
    return found


def json_line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "replace")
