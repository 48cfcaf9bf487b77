"""Repairing and normalising a document's text: mojibake (ftfy), Unicode normal form, lowercasing, emoji as names."""

from __future__ import annotations

import functools
import re
import unicodedata

from lmforge.config import NormalizeConfig
from lmforge.data.clean import clean_text

# Only the encoding repairs; clean_text owns line breaks and control characters, the `unicode_form` setting owns
# ligatures and full-width forms, and curly quotes are left alone because they are not damage.
FTFY_OPTIONS = dict(
    unescape_html="auto", fix_encoding=True, restore_byte_a0=True, replace_lossy_sequences=True,
    decode_inconsistent_utf8=True, fix_c1_controls=True, remove_terminal_escapes=True, fix_surrogates=True,
    fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
    remove_control_chars=False, normalization=None, explain=False,
)


@functools.cache
def ftfy_config():
    import ftfy

    return ftfy.TextFixerConfig(**FTFY_OPTIONS)


def char_class(chars) -> str:
    """A regex character class matching `chars`, with runs of consecutive characters written as ranges."""
    codes, ranges = sorted({ord(char) for char in chars}), []
    for code in codes:
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    parts = (re.escape(chr(first)) + (f"-{re.escape(chr(last))}" if last > first else "") for first, last in ranges)
    return "[" + "".join(parts) + "]"


@functools.cache
def mojibake_signs() -> re.Pattern:
    """A quick test for text that ftfy might change; most text fails it and never reaches ftfy, which is ~50x slower.

    UTF-8 read as a single-byte encoding turns each multi-byte character into a lead character (from bytes
    C0-F4) followed by continuation characters (from bytes 80-BF), or by a space where a non-breaking space was
    lost (ftfy restores those only after the leads in its ALTERED_UTF8_RE, and never in Mac Roman). ftfy's other
    repairs need C1 controls, an escape character or an HTML entity.
    """
    import ftfy.bad_codecs  # noqa: F401  (registers the "sloppy-windows-*" codecs ftfy decodes with)
    from ftfy.chardata import CHARMAP_ENCODINGS

    def decoded(byte_values, encodings) -> set[str]:
        return {char for encoding in encodings for char in bytes(byte_values).decode(encoding)}

    leads = decoded(range(0xC0, 0xF5), CHARMAP_ENCODINGS)
    continuations = decoded(range(0x80, 0xC0), CHARMAP_ENCODINGS)
    not_mac = [encoding for encoding in CHARMAP_ENCODINGS if encoding != "macroman"]
    leads_before_space = decoded([0xC2, 0xC3, 0xC5, 0xCE, 0xD0, 0xD9, 0xE2, 0xE3, 0xF0], not_mac)
    controls = {"\x1b", *map(chr, range(0x80, 0xA0))}
    # One character class first lets `re` skip quickly through text that holds none of these characters.
    return re.compile(f"{char_class(leads | controls | {'&'})}(?:(?<={char_class(leads)}){char_class(continuations)}"
                      f"|(?<={char_class(leads_before_space)}) |(?<={char_class(controls)})|(?<=&)#?\\w+;)")


@functools.cache
def emoji_signs() -> re.Pattern:
    """Every emoji holds a non-ASCII character from this set, so text without one needs no emoji pass."""
    import emoji

    chars = {char for sequence in emoji.EMOJI_DATA for char in sequence if not char.isascii() and ord(char) < 0x10000}
    # `re` tests astral characters against each range in turn; one range for all of them keeps the search fast.
    return re.compile(char_class(chars)[:-1] + "\U00010000-\U0010ffff]")


def emoji_name(sequence: str, data: dict) -> str:
    import emoji

    # Unqualified emoji are the text-style characters (©, ™, ↔, a bare ❤) that ordinary prose uses as symbols.
    if data["status"] == emoji.STATUS["unqualified"]:
        return sequence
    return data["en"]


class Normalizer:
    """Repairs one document's text according to the recipe's `normalize` section.

    Input is text cleaned by clean_text, so already NFC; `unicode_form: none` therefore leaves it NFC as well.
    """

    def __init__(self, config: NormalizeConfig):
        self.config = config

    def __call__(self, text: str) -> tuple[str, list[str]]:
        """The repaired text and the names of the changes made, from {"mojibake", "unicode_form", "lowercase",
        "emoji"}."""
        config, changes = self.config, []
        ascii_only = text.isascii()
        if config.fix_mojibake and not (ascii_only and "&" not in text) and mojibake_signs().search(text):
            import ftfy

            fixed = ftfy.fix_text(text, ftfy_config())
            if fixed != text:
                text, ascii_only = fixed, fixed.isascii()
                changes.append("mojibake")
        if config.unicode_form == "NFKC" and not ascii_only and not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
            changes.append("unicode_form")
        if config.emoji_to_text and not ascii_only and emoji_signs().search(text):
            import emoji

            named = emoji.replace_emoji(text, replace=emoji_name)
            if named != text:
                text = named
                changes.append("emoji")
        if config.lowercase:
            lowered = text.lower()
            if lowered != text:
                text = lowered
                changes.append("lowercase")
        if "mojibake" in changes or "unicode_form" in changes:
            # These repairs can bring back what cleaning removed: NFKC turns no-break and other spaces into U+0020
            # (trailing spaces), ftfy can decode control characters or text that is not NFC.
            text = clean_text(text)
        return text, changes
