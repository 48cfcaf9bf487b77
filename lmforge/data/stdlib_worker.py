"""Turn the docstrings of every importable standard-library module into readable documents.

This file runs as a script in a separate interpreter (started by ``stdlib_docs.py``), never imported
by lmforge: importing hundreds of modules has side effects (signal handlers, threads, output, the odd crash)
that must not reach the build process. It therefore imports nothing but the standard library.

Usage: ``python -S -P stdlib_worker.py [MODULE_TO_SKIP ...]``. It writes one JSON object per line to
its standard output, in a fixed order:

    {"start": "json"}                          before importing a module
    {"module": "json", "text": "..."}          the module's document
    {"failed": "winreg", "error": "..."}       the module could not be imported
    {"finished": true}                         everything was visited

If the interpreter dies or hangs inside a module, the last ``start`` names the culprit; the parent
reruns the worker with that module skipped.
"""

from __future__ import annotations

import enum
import inspect
import json
import os
import pkgutil
import re
import sys
import warnings

# Modules whose import has effects beyond defining things (opening a browser or windows, printing,
# writing grammar caches), the test suites, and pydoc's topics (read directly by stdlib_docs.py).
EXCLUDED_MODULES = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data"}
)
EXCLUDED_NAME_PARTS = frozenset({"test", "tests", "idle_test"})

# Reprs of objects in signatures carry memory addresses, which change on every run.
MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
MAX_DEFAULT_CHARS = 80


def is_documented_name(dotted_name: str) -> bool:
    parts = dotted_name.split(".")
    if parts[0] in EXCLUDED_MODULES or parts[0].startswith("xx"):
        return False
    return not any(part.startswith("_") or part in EXCLUDED_NAME_PARTS for part in parts)


def own_docstring(obj: object) -> str:
    """The object's own docstring, cleaned of indentation; inherited docstrings are not repeated."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


class ShownAs:
    """A default value standing in for another, so a signature prints ``text`` in its place."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def default_value_text(value: object) -> str:
    # Some defaults are evaluated from the machine that imports them (the whole environment, the
    # interpreter's path): name them instead, so the corpus is the same everywhere and leaks nothing.
    if value is os.environ:
        return "os.environ"
    if isinstance(value, str) and value == sys.executable:
        return "sys.executable"
    if isinstance(value, enum.Enum):  # the default repr shows the value, which can be a long internal object
        return f"{type(value).__name__}.{value.name}"
    text = MEMORY_ADDRESS.sub("", repr(value))
    return text if len(text) <= MAX_DEFAULT_CHARS else "..."


def signature_text(obj: object) -> str:
    """``(a, b=1, *, c=None)``, or ``(...)`` where Python cannot tell."""
    try:
        signature = inspect.signature(obj)
        parameters = [
            parameter.replace(default=ShownAs(default_value_text(parameter.default)))
            if parameter.default is not parameter.empty
            else parameter
            for parameter in signature.parameters.values()
        ]
        return MEMORY_ADDRESS.sub("", str(signature.replace(parameters=parameters)))
    except Exception:  # besides "no signature", evaluating C default values can raise anything
        return "(...)"


def section(heading: str, doc: str) -> str:
    return f"{heading}\n\n{doc}" if doc else heading


def is_defined_in(obj: object, module_name: str) -> bool:
    """True for objects the module defines itself or takes from a private module (``_json``,
    ``concurrent.futures._base``), where nothing public documents them."""
    origin = getattr(obj, "__module__", None)
    if not isinstance(origin, str):
        return True
    return origin == module_name or any(part.startswith("_") for part in origin.split("."))


def describe_class_members(cls: type, qualified_name: str) -> list[str]:
    sections = []
    for name, attribute in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attribute, (staticmethod, classmethod)):
            attribute = attribute.__func__
        if inspect.isroutine(attribute):
            sections.append(section(f"{qualified_name}.{name}{signature_text(attribute)}", own_docstring(attribute)))
        elif inspect.isdatadescriptor(attribute):  # properties, and attributes of C types
            doc = own_docstring(attribute)
            if doc:
                sections.append(section(f"{qualified_name}.{name}", doc))
    return sections


def public_members(module: object, module_name: str) -> list[tuple[str, object]]:
    """(name, object) for the module's public classes and functions, in ``__all__`` or definition order."""
    declared = getattr(module, "__all__", None)
    if isinstance(declared, (list, tuple)) and all(isinstance(name, str) for name in declared):
        names = list(declared)
    else:
        names = list(vars(module))
    members, seen = [], set()
    for name in names:
        if name.startswith("_"):
            continue
        try:
            obj = getattr(module, name)
        except BaseException:  # lazy module attributes run arbitrary code
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not is_defined_in(obj, module_name):
            continue
        if id(obj) in seen:  # an alias: documented under its first name
            continue
        seen.add(id(obj))
        members.append((name, obj))
    return members


def describe_member(qualified_name: str, obj: object) -> list[str]:
    if inspect.isclass(obj):
        heading = f"class {qualified_name}{signature_text(obj)}"
        return [section(heading, own_docstring(obj)), *describe_class_members(obj, qualified_name)]
    return [section(f"{qualified_name}{signature_text(obj)}", own_docstring(obj))]


def describe_module(module: object, module_name: str) -> str:
    """The module's docstring, then each public class (with its methods) and function with its docstring."""
    sections = [section(f"Module {module_name}", own_docstring(module))]
    for name, obj in public_members(module, module_name):
        try:
            sections.extend(describe_member(f"{module_name}.{name}", obj))
        except Exception:  # one odd object should not cost the whole module its document
            continue
    return "\n\n".join(sections)


def import_quietly(module_name: str) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        __import__(module_name)
    return sys.modules[module_name]


def submodule_names(module: object, module_name: str) -> list[str]:
    """Names of a package's submodules, found on disk without importing them."""
    path = getattr(module, "__path__", None)
    if path is None:
        return []
    try:
        return sorted(info.name for info in pkgutil.iter_modules(path, prefix=f"{module_name}."))
    except BaseException:
        return []


def visit(module_name: str, skip: set[str], emit, describe=None) -> None:
    """Document a module, then its submodules depth first, reporting each step through ``emit``.

    ``describe(module, name) -> str`` makes a module's text (default: ``describe_module``).
    """
    describe = describe or describe_module
    if module_name in skip or not is_documented_name(module_name):
        return
    emit({"start": module_name})
    try:
        module = import_quietly(module_name)
        text = describe(module, module_name)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from imports included
        emit({"failed": module_name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    emit({"module": module_name, "text": text})
    for name in submodule_names(module, module_name):
        visit(name, skip, emit, describe)


def main(skip: set[str], describe=None) -> None:
    # Results go to a private copy of stdout, and stdout itself becomes /dev/null, so that modules
    # printing at import time cannot corrupt the stream. Stderr stays: the parent keeps its tail.
    results = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

    def emit(record: dict) -> None:
        results.write(json.dumps(record) + "\n")
        results.flush()

    for module_name in sorted(sys.stdlib_module_names):
        visit(module_name, skip, emit, describe)
    emit({"finished": True})
    # Skip interpreter shutdown: threads or atexit handlers started by imported modules could hang it.
    os._exit(0)


if __name__ == "__main__":
    main(set(sys.argv[1:]))
