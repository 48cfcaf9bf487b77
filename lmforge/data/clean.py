"""Normalising text, cutting long documents into pieces, and the keep-or-drop decision for each piece."""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 control characters, except tab and newline (carriage returns are turned into newlines first).
CONTROL_CHARACTERS = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)])
# Lone surrogates cannot be written as UTF-8; they only arrive through JSON escapes like "\ud800".
SURROGATES = re.compile("[\ud800-\udfff]")
MORE_THAN_TWO_BLANK_LINES = re.compile(r"\n{4,}")
PARAGRAPH_BREAK = re.compile(r"(\n{2,})")
LINE_BREAK = re.compile(r"(\n)")


def clean_text(text: str) -> str:
    """Normalise a document: newlines to ``\\n``, control characters removed (tab and newline kept),
    Unicode NFC, no trailing whitespace on any line, at most two blank lines in a row, and no blank
    lines at the start or end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(CONTROL_CHARACTERS)
    if not text.isascii():
        text = SURROGATES.sub("", text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return MORE_THAN_TWO_BLANK_LINES.sub("\n\n\n", text).strip("\n")


def cut_into_pieces(text: str, max_chars: int) -> list[str]:
    """Cut a cleaned document into pieces of at most ``max_chars`` characters.

    Cuts fall between paragraphs (at blank lines), as many paragraphs as fit going into each piece;
    a paragraph longer than the limit is cut between lines, and a line longer than the limit at a
    space, or anywhere as a last resort. An empty text gives one empty piece, so every document
    read leaves a trace in the report.
    """
    if len(text) <= max_chars:
        return [text]
    return [piece for piece in pack(text, max_chars, (PARAGRAPH_BREAK, LINE_BREAK)) if piece]


def pack(text: str, max_chars: int, breaks: tuple[re.Pattern, ...]) -> list[str]:
    """Split ``text`` at the first kind of break and regroup the parts greedily into pieces that fit;
    parts that are still too long are packed with the remaining, finer kinds of break."""
    if len(text) <= max_chars:
        return [text]
    if not breaks:
        return hard_cut(text, max_chars)
    parts = breaks[0].split(text)  # [unit, separator, unit, separator, ..., unit]
    pieces: list[str] = []
    current = ""
    for index in range(0, len(parts), 2):
        unit, separator = parts[index], parts[index - 1] if index else ""
        if current and len(current) + len(separator) + len(unit) <= max_chars:
            current += separator + unit
            continue
        if current:
            pieces.append(current)
        if len(unit) > max_chars:
            pieces.extend(pack(unit, max_chars, breaks[1:]))
            current = ""
        else:
            current = unit
    if current:
        pieces.append(current)
    return pieces


def hard_cut(line: str, max_chars: int) -> list[str]:
    pieces = []
    while len(line) > max_chars:
        # Prefer the last space in the second half of the window, so words stay whole.
        space = line.rfind(" ", max_chars // 2, max_chars + 1)
        cut = space if space > 0 else max_chars
        pieces.append(line[:cut].rstrip())
        line = line[cut:].lstrip()
    pieces.append(line)
    return pieces


def rejection_reason(piece: str, min_chars: int) -> str | None:
    """``"empty"``, ``"too_short"`` or None for a piece worth keeping (duplicates are judged separately)."""
    if not piece.strip():
        return "empty"
    if len(piece) < min_chars:
        return "too_short"
    return None
