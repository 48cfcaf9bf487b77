"""The Python standard library's own documentation: a real, license-clean corpus that needs no download.

Two parts: pydoc's topics (the language reference's help texts: ``help("assert")``) and the docstrings
of every importable, public standard-library module and submodule, one document per module. The
modules are imported in a separate interpreter (``stdlib_worker.py``) so that their import-time
side effects, a hang or a crash cannot reach the build; a module that kills or stalls the worker is
skipped and the worker restarted. The output is the same on every run of the same Python.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmforge.data.readers import RawDocument
from lmforge.errors import LmforgeError

WORKER_SCRIPT = Path(__file__).with_name("stdlib_worker.py")
# Importing a module takes milliseconds; a worker silent for this long is stuck inside one.
SILENCE_LIMIT_SECONDS = 60.0
MAX_WORKER_RUNS = 6


@dataclass
class ModuleDocs:
    """What the worker produced: documents as (module name, text), and the modules it could not document."""

    documents: list[tuple[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def topic_documents() -> list[RawDocument]:
    """One document per pydoc topic, in name order."""
    from pydoc_data.topics import topics

    return [RawDocument(f"stdlib/topic/{name}", topics[name], f"stdlib:topic {name}", kind="text") for name in sorted(topics)]


def module_documents(progress: bool = True) -> tuple[list[RawDocument], list[dict[str, str]]]:
    """One document per importable public stdlib module, and the modules that failed ({"module", "error"})."""
    docs = collect_module_docs(progress=progress)
    documents = [RawDocument(f"stdlib/module/{name}", text, f"stdlib:module {name}", kind="text") for name, text in docs.documents]
    return documents, docs.failed


def collect_module_docs(
    worker_script: Path = WORKER_SCRIPT, silence_limit_seconds: float = SILENCE_LIMIT_SECONDS, progress: bool = False
) -> ModuleDocs:
    """Run the worker until it gets through every module, skipping each module it dies or hangs in."""
    culprits: dict[str, str] = {}
    for _ in range(MAX_WORKER_RUNS):
        docs, culprit, problem = run_worker(worker_script, sorted(culprits), silence_limit_seconds, progress)
        if culprit is None and problem is None:
            docs.failed.extend({"module": name, "error": why} for name, why in sorted(culprits.items()))
            docs.failed.sort(key=lambda failure: failure["module"])
            return docs
        if culprit is None:
            raise LmforgeError(f"the stdlib documentation extractor failed before importing anything: {problem}")
        culprits[culprit] = problem
    raise LmforgeError(
        f"the stdlib documentation extractor failed {MAX_WORKER_RUNS} times, in modules {', '.join(culprits)}; "
        "use a file source instead of `stdlib`"
    )


def run_worker(
    worker_script: Path, skip: list[str], silence_limit_seconds: float, progress: bool
) -> tuple[ModuleDocs, str | None, str | None]:
    """One run of the worker: (documents, module it died in or None, what went wrong or None)."""
    # No PYTHON* variables (PYTHONPATH could shadow stdlib modules), a fixed hash seed (set and dict
    # reprs in signatures would otherwise change order between runs), no site-packages (-S) and no
    # script folder on sys.path (-P); a scratch working folder catches any file an import writes.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    env.update(PYTHONHASHSEED="0", PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-S", "-P", str(worker_script), *skip]
    docs = ModuleDocs()
    current_module = None
    with tempfile.TemporaryDirectory(prefix="lmforge-stdlib-") as scratch, tempfile.TemporaryFile() as stderr:
        worker = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=scratch
        )
        lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=pump_lines, args=(worker.stdout, lines), daemon=True).start()
        bar = tqdm(desc="stdlib modules", unit="module", disable=not progress, file=sys.stderr, leave=False)
        try:
            while True:
                try:
                    line = lines.get(timeout=silence_limit_seconds)
                except queue.Empty:
                    return docs, current_module, f"no progress for {silence_limit_seconds:g} s (hung)"
                if line is None:
                    return docs, current_module, f"the worker exited with status {worker.wait()}: {tail(stderr)}"
                try:
                    record = json.loads(line)
                except ValueError:
                    return docs, current_module, f"garbled output: {line[:100]!r}"
                if record.get("finished"):
                    return docs, None, None
                if "start" in record:
                    current_module = record["start"]
                    bar.update()
                elif "module" in record:
                    docs.documents.append((record["module"], record["text"]))
                elif "failed" in record:
                    docs.failed.append({"module": record["failed"], "error": record["error"]})
        finally:
            bar.close()
            if worker.poll() is None:
                worker.kill()
            worker.wait()


def pump_lines(stream, lines: queue.Queue) -> None:
    """Forward the worker's output lines, then None at its end (a thread, so the reader can time out)."""
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


def tail(stream, max_chars: int = 300) -> str:
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip()
    return " ".join(text[-max_chars:].split()) or "(nothing on stderr)"
