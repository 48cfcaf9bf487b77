"""List the public functions and classes of every importable standard-library module with their docstrings.

Like ``lmforge/data/stdlib_worker.py`` (whose module walk and member rules it reuses, so the questions
are about exactly what the corpus documents), this runs as a script in a separate interpreter, started
by ``stdlib_qa.py`` through ``stdlib_docs.collect_module_docs``: imports have side effects that must not
reach the build. It speaks the same line protocol, except that a module's ``text`` is a JSON list of
``[qualified name, kind, docstring]`` with kind ``function``, ``class`` or ``exception``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path

# The corpus worker is a script, not an importable module (this interpreter runs with -P and without
# lmforge on its path), so it is loaded from its file.
_spec = importlib.util.spec_from_file_location("_lmforge_stdlib_worker", Path(__file__).resolve().parent.parent / "data" / "stdlib_worker.py")
corpus_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus_worker)

MAX_DOC_CHARS = 2000  # the summary comes from the first paragraphs; the rest is never needed


def member_kind(obj: object) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function"


def describe_members(module: object, module_name: str) -> list[list[str]]:
    entries = []
    for name, obj in corpus_worker.public_members(module, module_name):
        try:
            doc = corpus_worker.own_docstring(obj)
        except Exception:  # an odd object should not cost the module its entries
            continue
        if doc:
            entries.append([f"{module_name}.{name}", member_kind(obj), doc[:MAX_DOC_CHARS]])
    return entries


def visit(module_name: str, skip: set[str], emit) -> None:
    """Describe a module's members, then its submodules depth first (the corpus worker's order)."""
    if module_name in skip or not corpus_worker.is_documented_name(module_name):
        return
    emit({"start": module_name})
    try:
        module = corpus_worker.import_quietly(module_name)
        entries = describe_members(module, module_name)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from imports included
        emit({"failed": module_name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    emit({"module": module_name, "text": json.dumps(entries)})
    for name in corpus_worker.submodule_names(module, module_name):
        visit(name, skip, emit)


def main(skip: set[str]) -> None:
    # As in the corpus worker: results on a private copy of stdout, stdout itself silenced.
    results = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

    def emit(record: dict) -> None:
        results.write(json.dumps(record) + "\n")
        results.flush()

    for module_name in sorted(sys.stdlib_module_names):
        visit(module_name, skip, emit)
    emit({"finished": True})
    os._exit(0)  # threads or atexit handlers started by imported modules could hang a normal shutdown


if __name__ == "__main__":
    main(set(sys.argv[1:]))
