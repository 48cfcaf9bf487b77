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


def describe_members_as_text(module: object, module_name: str) -> str:
    return json.dumps(describe_members(module, module_name))


if __name__ == "__main__":
    corpus_worker.main(set(sys.argv[1:]), describe=describe_members_as_text)
