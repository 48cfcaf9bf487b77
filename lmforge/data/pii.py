"""Scrubbing personal data and secrets: each match becomes a typed placeholder such as `<EMAIL>`.

Kinds are looked for in a fixed order, and text claimed by one kind is hidden from the later ones, so a
match is always replaced whole and never shares characters with another:

    secret -> email -> iban -> credit_card -> ip -> phone

Secrets come first because tokens and key blocks contain digits, `@` and dots that later kinds would bite
into; e-mail before the digit kinds so `jane.1985@example.org` is one e-mail, not an e-mail with a number;
IBANs before card numbers (an IBAN's digits can pass Luhn); IPs before phones (`10.0.0.1` looks like a
dotted number). Phones come last because their patterns are the loosest.

Precision over recall where they conflict, because a documentation corpus is full of numbers. What is
deliberately NOT scrubbed (tests/test_data_pii.py checks each):
- `@property`, `user@localhost`, `name@host`: an e-mail needs a dotted domain ending in a 2+ letter TLD.
- Phones need a leading `+`/`00` country code, the North American (555) 123-4567 / 555-123-4567 /
  555.123.4567 shapes, or a European national number starting with `0` in separated groups; plain digit
  runs, dates, times, ISBNs, version numbers and ranges match none of these. 555 123 4567 (spaces only, no
  +1) counts only after a word such as "call", "phone" or "mobile": tables of numbers look the same.
- An IPv4 address preceded by a version word (`v`, `version`, `release`, `Python`, ...) is a version string;
  IPv6 needs a group of 3+ hex digits, so slices (`a[1::2]`) and `::1` stay.
- Card numbers must pass Luhn and have a card brand's prefix and length; IBANs need a known country, its exact
  length and the mod-97 check.
- A generic `password = ...` / `token: ...` value must be 12+ characters of mixed character classes with
  high entropy, so `token = tokenizer(text)`, `password = getpass.getpass()` and `api_key: YOUR_API_KEY` stay.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from typing import Callable, Iterator, Sequence

from lmforge.config import PII_KINDS
from lmforge.errors import LmforgeError

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>",
                "secret": "<SECRET>"}
ORDER = ("secret", "email", "iban", "credit_card", "ip", "phone")
# Claimed text is overwritten with this before later kinds look, keeping offsets: it is neither a word
# character, a digit nor a separator any pattern accepts, so nothing can match into or across it.
MASK = "\x00"

Span = tuple[int, int, str]  # (start, end, kind) in the original text

# Secrets. Every token shape starts with a fixed prefix, so only the places where one occurs are tried
# ("gh" is rare enough in English to look for five of GitHub's prefixes at once).
TOKEN_HINTS = ("AKIA", "ASIA", "AIza", "gh", "github_pat_", "xox", "sk-", "eyJ")
TOKEN_SECRET = re.compile(
    r"(?<![\w-])(?:"
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}"  # GitHub classic tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub fine-grained tokens
    r"|xox[bpoars]-[A-Za-z0-9-]{10,255}"  # Slack
    r"|sk-(?:proj-|ant-|live_|test_)?(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{20,}"  # OpenAI-style
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT: base64url JSON header, payload, signature
    r")(?![\w-])"
)
# A key block (the largest RSA keys take 13 KB), or its start up to the last base64 line when the END line was
# cut off. The block may not contain another BEGIN, which keeps text full of unterminated ones linear.
PEM_SECRET = re.compile(
    r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----"
    r"(?:(?:(?!-----BEGIN ).){0,20000}?-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----|(?:[ \t]*\r?\n[A-Za-z0-9+/=]+)+)",
    re.S,
)
# `password = "..."`, `"api_key": "..."`, `DB_PASSWORD=...`, `Authorization: Bearer ...`: only the value is replaced.
# The pattern is tried where a key word starts in the lowercased text; the identifier's last word is enough
# (`api_key`, `DB_PASSWORD`, `client_secret` all end in one).
SECRET_KEY_WORDS = ("passw", "pwd", "secret", "key", "token", "bearer")
ASSIGNED_SECRET = re.compile(
    r"(?:(?:passw(?:or)?d|pwd|secret|key|token)[\"']?[ \t]*(?::=|[:=])[ \t]*[\"']?|(?<![\w-])bearer[ \t]+)"
    # A value runs to a quote, space or delimiter; one followed by "(" or "[" is code (getpass.getpass()).
    # Possessive and capped, so a run such as "key=key=key=..." costs little though every "key" starts an attempt.
    r"(?P<value>[A-Za-z0-9+/=_\-!@#$%^&*~.]{12,512}+)(?=[\"'\s,;)}\]]|$)",
    re.I,
)

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9_%+-](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w-]|\.[A-Za-z0-9])"
)

IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
# Candidates are cut to their country's exact length afterwards, so this may run on into following text.
IBAN_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")

CARD_CANDIDATE = re.compile(
    r"(?<![\w.,+-])(?<!\d[ -])(?:\d{4}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{4}(?:(?P=sep)\d{1,3})?"  # 4-4-4-4(-3)
    r"|\d{4}(?P<amex>[ -])\d{6}(?P=amex)\d{4,5}"  # Amex and Diners 4-6-5 / 4-6-4
    r"|\d{13,19})(?![\w]|[.,-]\d| \d)"
)

OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.-]){OCTET}(?:\.{OCTET}){{3}}(?![\w-]|\.\d)")
VERSION_BEFORE = re.compile(r"(?i)(?:\bv|\bver|\bversion|\brelease|\bpython|\bbuild|\bvers\.)\s*$")
IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}"  # full form
    r"|(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?)"  # compressed
    r"(?:(?:(?<=:)|:)\d{1,3}(?:\.\d{1,3}){3})?"  # an embedded IPv4 tail, ::ffff:192.0.2.1
    r"(?![\w]|\.\d|:[0-9A-Fa-f])"
)
IPV6_LONG_GROUP = re.compile(r"[0-9A-Fa-f]{3}")

PHONE = re.compile(
    # Not inside a longer run of groups: a hex dump, a number table, a bad-checksum IBAN (NL92 LBSC 0218 7855 25).
    r"(?<![\w+.,/-])(?<!\d[ -])(?<![A-Z]{2}\d\d [A-Z0-9]{4} )(?:"
    # International: +CC or 00CC, then separated groups, where "(0)" may sit before a group: +44 (0)20 7946 0958.
    r"(?:\+|00)[1-9]\d{0,2}(?:(?:[ .-]|(?<=\)))(?:\(\d{1,4}\)|\d{1,10})){1,6}"
    r"|\+[1-9]\d{7,14}"  # E.164 digits alone
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567; one separator throughout.
    r"|(?:1[ .-]?)?\([2-9]\d\d\) ?\d{3}[ .-]\d{4}"
    r"|(?:1[.-])?[2-9]\d\d(?P<sep>[.-])\d{3}(?P=sep)\d{4}"
    # European national numbers: a 0 trunk prefix and an area code, then separated groups.
    r"|0[1-9](?: \d\d){4}"  # 06 12 34 56 78
    # 030 12345678, 089/1234567, 020 7946 0958; two groups need 5+ digits in the second, unlike a US ZIP+4 (02110-1301).
    r"|(?:\(0[1-9]\d{0,3}\)|0[1-9]\d{0,3})(?:[ /-]\d{5,8}|[ /-]\d{3,8}(?:[ -]\d{2,5}){1,2})"
    r")(?![\w-]|[.,:/]\d| \d)"
)
SPACED_PHONE = re.compile(r"(?<![\w+.,/-])(?<!\d )[2-9]\d\d \d{3} \d{4}(?![\w-]|[.,:/]\d| \d)")
PHONE_CUE = re.compile(r"(?i)\b(?:phone|tel|call|mobile|cell|fax|contact|reach|dial|text|number)\b[^\n\d]{0,24}$")
# Digits that real numbers have, by how they start: +CC (a "(0)" trunk adds one), 00CC, 0 national, North American.
PHONE_DIGITS = {"+": (8, 16), "00": (10, 17), "0": (9, 13)}


def phone_digits_plausible(number: str) -> bool:
    digits = sum(char.isdigit() for char in number)
    start = number.lstrip("(")
    prefix = "+" if start[0] == "+" else "00" if start.startswith("00") else "0" if start[0] == "0" else ""
    low, high = PHONE_DIGITS.get(prefix, (10, 11))
    return low <= digits <= high


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# (lowest prefix, highest prefix, lengths) of the major card brands: Visa, Mastercard, Amex, Diners, Discover,
# UnionPay, JCB. A long integer that happens to pass Luhn rarely also has a brand's prefix and length.
CARD_BRANDS = (
    ("4", "4", (13, 16, 19)), ("51", "55", (16,)), ("2221", "2720", (16,)), ("34", "34", (15,)), ("37", "37", (15,)),
    ("36", "36", (14,)), ("300", "305", (14,)), ("38", "39", (14, 16)), ("6011", "6011", (16, 19)),
    ("644", "649", (16, 19)), ("65", "65", (16, 19)), ("62", "62", (16, 17, 18, 19)), ("3528", "3589", (16, 19)),
)


def card_brand_matches(digits: str) -> bool:
    return any(low <= digits[:len(low)] <= high and len(digits) in lengths for low, high, lengths in CARD_BRANDS)


def iban_valid(compact: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, and the number mod 97 is 1."""
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def shannon_entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(count / len(text) * math.log2(count / len(text)) for count in counts.values())


def looks_random(value: str) -> bool:
    """A generic secret value: long, mixing character classes, and high entropy (not a word or CONSTANT_NAME)."""
    classes = sum((any(c.islower() for c in value), any(c.isupper() for c in value), any(c.isdigit() for c in value)))
    return classes >= 2 and shannon_entropy(value) >= 3.0


def literal_positions(text: str, literal: str) -> Iterator[int]:
    if literal not in text:  # the common case, and cheaper than starting a search loop
        return
    position = text.find(literal)
    while position >= 0:
        yield position
        position = text.find(literal, position + 1)


def near(pattern: re.Pattern, text: str, anchors: list[tuple[int, int]], before: int, after: int) -> Iterator[re.Match]:
    """Matches of ``pattern`` that overlap an anchor, searched only within ``before``/``after`` characters of one.

    ``before`` and ``after`` must exceed the longest match, so no match that overlaps an anchor lies outside the
    searched window; a match that ends at a window's end may have been cut short by it and is not trusted.
    """
    windows: list[list] = []  # [start, end, anchors inside]
    for anchor in anchors:
        start, end = max(0, anchor[0] - before), min(len(text), anchor[1] + after)
        if windows and start <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], end)
            windows[-1][2].append(anchor)
        else:
            windows.append([start, end, [anchor]])
    for start, end, inside in windows:
        for match in pattern.finditer(text, start, end):
            cut_short = match.end() == end < len(text)
            if not cut_short and any(a < match.end() and match.start() < b for a, b in inside):
                yield match


def find_secrets(text: str, numbers: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for position in literal_positions(text, "-----BEGIN "):
        if match := PEM_SECRET.match(text, position):
            yield match.span()
    for hint in TOKEN_HINTS:
        for position in literal_positions(text, hint):
            if match := TOKEN_SECRET.match(text, position):
                yield match.span()
    lowered = text.lower()
    if len(lowered) == len(text):
        matches = (ASSIGNED_SECRET.match(text, position) for word in SECRET_KEY_WORDS
                   for position in literal_positions(lowered, word))
    else:  # a few characters lowercase to two, which would shift the offsets
        matches = ASSIGNED_SECRET.finditer(text)
    for match in matches:
        if match and looks_random(match["value"]):
            yield match.span("value")


def find_emails(text: str, numbers: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    if "@" not in text:
        return
    at_signs = [(position, position + 1) for position in literal_positions(text, "@")]
    for match in near(EMAIL, text, at_signs, before=70, after=260):
        yield match.span()


# Every IBAN, card number, IPv4 address and phone number contains a run of 7+ digits and separators
# (the shortest, 0.0.0.0, has 7), so those patterns are only tried near such runs. MAX_NUMBER_CHARS bounds
# how far a match reaches beyond its run: the longest IBAN candidate, 64 characters.
NUMBER_RUN = re.compile(r"\d[\d .()/+-]{5,}\d", re.ASCII)
MAX_NUMBER_CHARS = 70


def near_numbers(pattern: re.Pattern, text: str, numbers: list[tuple[int, int]]) -> Iterator[re.Match]:
    return near(pattern, text, numbers, MAX_NUMBER_CHARS, MAX_NUMBER_CHARS)


def find_ibans(text: str, numbers: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for match in near_numbers(IBAN_CANDIDATE, text, numbers):
        candidate = match.group()
        length = IBAN_LENGTHS.get(candidate[:2])
        if length is None:
            continue
        # Take exactly the country's number of characters; it must end where a group (or the text) ends.
        end, count = 0, 0
        while count < length and end < len(candidate):
            count += candidate[end] != " "
            end += 1
        if count != length or (end < len(candidate) and candidate[end] != " "):
            continue
        if iban_valid(candidate[:end].replace(" ", "")):
            yield match.start(), match.start() + end


def find_cards(text: str, numbers: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for match in near_numbers(CARD_CANDIDATE, text, numbers):
        digits = match.group().replace(" ", "").replace("-", "")
        if card_brand_matches(digits) and luhn_valid(digits):
            yield match.span()


# Every IPv6 address has "::" or "h:hhhh:"; a pattern starting with a literal is searched for fast.
IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")


def find_ips(text: str, numbers: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    hints = [match.span() for match in IPV6_HINT.finditer(text)] if "::" in text or text.count(":") > 6 else []
    for match in near(IPV6_CANDIDATE, text, hints, before=45, after=45):
        candidate = match.group()
        if not IPV6_LONG_GROUP.search(candidate):
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield match.span()
    for match in near_numbers(IPV4, text, numbers):
        if not VERSION_BEFORE.search(text, max(0, match.start() - 12), match.start()):
            yield match.span()


def find_phones(text: str, numbers: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for match in near_numbers(PHONE, text, numbers):
        if phone_digits_plausible(match.group()):
            yield match.span()
    for match in near_numbers(SPACED_PHONE, text, numbers):
        if PHONE_CUE.search(text, max(0, match.start() - 40), match.start()):
            yield match.span()


FINDERS: dict[str, Callable[[str, list[tuple[int, int]]], Iterator[tuple[int, int]]]] = {
    "secret": find_secrets, "email": find_emails, "iban": find_ibans, "credit_card": find_cards, "ip": find_ips,
    "phone": find_phones,
}


NUMBER_KINDS = ("iban", "credit_card", "phone")  # kinds found only near NUMBER_RUN matches


class PiiScrubber:
    """Replaces e-mail addresses, phone numbers, IPs, card numbers, IBANs and secrets with typed placeholders."""

    def __init__(self, kinds: Sequence[str]):
        unknown = sorted(set(kinds) - set(PII_KINDS))
        if unknown:
            raise LmforgeError(f"unknown PII kind(s) {', '.join(unknown)}; choose from {', '.join(PII_KINDS)}")
        self.kinds = [kind for kind in ORDER if kind in kinds]

    def __call__(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every match replaced by its kind's placeholder, and the count per kind (only kinds found)."""
        spans = self.find(text)
        if not spans:
            return text, {}
        pieces, counts, position = [], Counter(), 0
        for start, end, kind in spans:
            pieces += [text[position:start], PLACEHOLDERS[kind]]
            counts[kind] += 1
            position = end
        pieces.append(text[position:])
        return "".join(pieces), dict(counts)

    def find(self, text: str) -> list[Span]:
        """Every match as (start, end, kind), sorted and non-overlapping, in the original text's offsets."""
        spans: list[Span] = []
        numbers = [match.span() for match in NUMBER_RUN.finditer(text)]
        for kind in self.kinds:
            if not numbers and kind in NUMBER_KINDS:
                continue
            found = merge_overlaps([(start, end, kind) for start, end in FINDERS[kind](text, numbers) if end > start])
            if not found:
                continue
            spans += found
            # Hide what this kind claimed from the kinds after it.
            pieces, position = [], 0
            for start, end, _ in found:
                pieces += [text[position:start], MASK * (end - start)]
                position = end
            pieces.append(text[position:])
            text = "".join(pieces)
        return sorted(spans)


def merge_overlaps(spans: list[Span]) -> list[Span]:
    """Sorted spans of one kind, overlapping ones merged, so no part of any match is left unreplaced."""
    merged: list[Span] = []
    for start, end, kind in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), kind)
        else:
            merged.append((start, end, kind))
    return merged
