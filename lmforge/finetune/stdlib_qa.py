"""The built-in instruction set: questions about standard-library functions and classes, answered by their docstrings.

"What does `json.dumps` do?" is answered by the first sentence of ``json.dumps``'s docstring:
"Serialize `obj` to a JSON formatted `str`." The names and docstrings are the ones the default corpus
is made of (the same module walk, in a separate interpreter: ``stdlib_qa_worker.py``), so a model
pretrained on that corpus has read every answer; fine-tuning teaches it to give one when asked.

The set is a pure function of the Python version, the tokenizer and the context length: the same
every time. Each name gets one question, phrased one of a few ways chosen by a hash of the name, and
names are held out for evaluation by the same kind of hash (``conversations.is_held_out``), so no
held-out function has a question in the training set.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.artifacts import fingerprint
from lmforge.finetune.conversations import Conversation

WORKER_SCRIPT = Path(__file__).resolve().with_name("stdlib_qa_worker.py")
BUILTIN_DATASET = "stdlib"
BUILTIN_VERSION = 1  # bump when the questions or answers change, so finished SFT stages rerun

QUESTIONS = {
    "function": ("What does {name} do?", "What is {name} for?", "What does the function {name} do?", "Explain {name}."),
    "class": ("What is {name}?", "What is the class {name} for?", "Describe {name}.", "What does {name} represent?"),
    "exception": ("What is {name}?", "When is {name} raised?", "What does the exception {name} mean?"),
}
# How the name is written: as code, the way documentation questions are usually typed, or plain.
NAME_STYLES = ("`{name}`", "`{name}`", "{name}")

# A first paragraph that is only a call signature ("chain(*iterables) --> chain object"), as C functions
# and classes often start; the summary is then the next paragraph.
SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(-+>.*)?$", re.S)
# The end of a sentence: punctuation, space, then something that starts one.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")
# reStructuredText markup, shown the way chat answers write code: ``x`` and :func:`x` become `x`.
DOUBLE_BACKTICKS = re.compile(r"``([^`]+)``")
ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
MIN_WORDS = 3


@dataclass(frozen=True)
class DocEntry:
    """A public function or class and its docstring, as the worker found it."""

    name: str  # qualified: json.dumps
    kind: str  # function, class or exception
    doc: str


def collect_entries(progress: bool = False) -> list[DocEntry]:
    """Every public stdlib function and class with a docstring, in the corpus's module order."""
    import json

    from lmforge.data.stdlib_docs import collect_module_docs

    docs = collect_module_docs(WORKER_SCRIPT, progress=progress)
    return [DocEntry(*entry) for _, text in docs.documents for entry in json.loads(text)]


def summary_of(doc: str) -> str | None:
    """The docstring's first sentence with its markup simplified, or None when it has no usable one.

    Unusable: no prose before a blank line other than a call signature, or fewer than three words
    (``ast.Mult``'s docstring is "Mult").
    """
    for paragraph in doc.split("\n\n"):
        paragraph = " ".join(paragraph.split())
        if not paragraph or SIGNATURE.match(paragraph):
            continue
        sentence = SENTENCE_END.split(paragraph, maxsplit=1)[0]
        sentence = ROLE.sub(r"`\1`", DOUBLE_BACKTICKS.sub(r"`\1`", sentence))
        return sentence if len(sentence.split()) >= MIN_WORDS else None
    return None


def stable_choice(key: str, options: tuple[str, ...]) -> str:
    """One of ``options``, the same for ``key`` on every machine and run (no PYTHONHASHSEED dependence)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def question_for(entry: DocEntry) -> str:
    name = stable_choice(f"{entry.name}|style", NAME_STYLES).format(name=entry.name)
    return stable_choice(entry.name, QUESTIONS[entry.kind]).format(name=name)


def fit_answer(tokenizer, question: str, answer: str, context_length: int) -> str | None:
    """``answer``, or its longest start cut at a word and ended with "...", such that the whole
    conversation (BOS, both messages and their control tokens) fits in ``context_length`` tokens.
    None when not even a few words fit."""
    from lmforge.finetune.conversations import render

    def fits(text: str) -> bool:
        return len(render(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": text}]).ids) <= context_length

    if fits(answer):
        return answer
    words = answer.split()
    low, high = 0, len(words)  # words[:low] + "..." fits (or low is 0); words[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if fits(" ".join(words[:middle]) + "..."):
            low = middle
        else:
            high = middle
    return " ".join(words[:low]) + "..." if low >= MIN_WORDS else None


def builtin_conversations(tokenizer, context_length: int, progress: bool = False) -> tuple[list[Conversation], dict]:
    """The built-in set: one question/answer conversation per documented name, and counts of what was left out."""
    entries = collect_entries(progress=progress)
    conversations, counts = [], {"names": len(entries), "no_usable_summary": 0, "answers_trimmed": 0, "too_long": 0}
    for entry in entries:
        summary = summary_of(entry.doc)
        if summary is None:
            counts["no_usable_summary"] += 1
            continue
        question = question_for(entry)
        answer = fit_answer(tokenizer, question, summary, context_length)
        if answer is None:
            counts["too_long"] += 1
            continue
        counts["answers_trimmed"] += answer != summary
        messages = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
        conversations.append(Conversation(messages, source=f"stdlib:{entry.name}", split_key=entry.name))
    counts["conversations"] = len(conversations)
    return conversations, counts


def builtin_fingerprint() -> str:
    """What the built-in set depends on besides the tokenizer and context: the Python and this module's rules."""
    return fingerprint(BUILTIN_DATASET, BUILTIN_VERSION, sys.version)
