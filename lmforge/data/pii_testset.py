"""A seeded, labelled set for measuring PII scrubbing: paragraphs with planted PII at known spans, and hard negatives.

Shared by tests/test_data_pii.py and bench/bench_pii.py. Every planted value is valid for its kind (Luhn- and
mod-97-checked numbers, real token shapes) and comes in the formats people write; the negatives are the numbers
and symbols a documentation corpus is full of (versions, dates, ISBNs, hashes, UUIDs, decorators, invalid
checksums, arithmetic) and must come out untouched. Scoring is by exact span: a planted span is found when
the scrubber claims exactly those characters as that kind.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import ipaddress
import json
import random
import string
import uuid
from dataclasses import dataclass, field

from lmforge.data.pii import PiiScrubber, iban_valid, luhn_valid

Span = tuple[int, int, str]
ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
BASE64URL = ALNUM + "-_"

FIRST_NAMES = ["jane", "john", "maria", "wei", "olga", "ahmed", "lucia", "kenji", "priya", "tom", "anna", "luc"]
LAST_NAMES = ["doe", "smith", "garcia", "chen", "ivanova", "hassan", "rossi", "sato", "patel", "meyer", "novak"]
DOMAINS = ["example.com", "mail.example.org", "example.co.uk", "uni-example.edu", "dev.example.io", "example.de",
           "corp.example.net"]

FILLER = [
    "The parser reads the whole file before it returns the first record.",
    "This section explains how the cache is invalidated when a key changes.",
    "In 2023 the team grew to 15 people and moved to a new office.",
    "The function returns 42 items when the limit is left at its default.",
    "Most users never need to change these settings.",
    "A call to close() flushes the buffer and releases the lock.",
    "See the previous chapter for a gentler introduction to the topic.",
    "Results are sorted by name, then by date of creation.",
    "The meeting ran for 3 hours, and 2 of the 9 items were postponed.",
    "Each worker handles about 250 requests per second on a laptop.",
    "It is safe to call this method from several threads at once.",
    "The report lists every warning with its file and line number.",
    "Roughly 60 percent of the budget went to hardware last year.",
    "Unlike the old interface, the new one never blocks.",
]

POSITIVE_TEMPLATES = {
    "email": ["Please contact {} for access.", "Send the signed form to {}, not to the list.", "Maintainer: <{}>",
              "Questions go to mailto:{} or the forum.", "Reply to \"{}\" before Friday.", "Her address is {}."],
    "phone": ["Call us on {} during office hours.", "Phone: {}", "Reach the front desk at {}, extension 12.",
              "Mobile ({}) is preferred.", "If nobody answers, try {}."],
    "ip": ["The server listens on {} by default.", "Requests from {} were blocked.", "Connect to {}:8080 to see it.",
           "The host resolved to {}.", "Add {} to the allow list."],
    "credit_card": ["Card number {} was charged twice.", "Pay with {} (expires 04/27).", "The customer's card: {}",
                    "Refund sent to {}."],
    "iban": ["Transfer the fee to IBAN {}.", "Account: {}", "Wire the money to {} by Monday.", "Our IBAN is {}."],
}
SECRET_ASSIGNMENTS = ['password = "{}"', "api_key: {}", "token={}", '"client_secret": "{}"', "export DB_PASSWORD={}",
                      "Authorization: Bearer {}", "AWS_SECRET_ACCESS_KEY='{}'"]
SECRET_TEMPLATES = ["The leaked key was {}.", "config: {}", "Rotate {} immediately.", "Found in the log: {}"]


@dataclass
class LabelledText:
    text: str
    spans: list[Span] = field(default_factory=list)


class Builder:
    """Text assembled from pieces, remembering where the planted values are."""

    def __init__(self):
        self.pieces: list[str] = []
        self.spans: list[Span] = []
        self.length = 0

    def add(self, text: str, kind: str | None = None) -> None:
        if kind is not None:
            self.spans.append((self.length, self.length + len(text), kind))
        self.pieces.append(text)
        self.length += len(text)

    def add_template(self, template: str, value: str, kind: str | None) -> None:
        before, after = template.split("{}")
        self.add(before)
        self.add(value, kind)
        self.add(after)

    def result(self) -> LabelledText:
        return LabelledText("".join(self.pieces), self.spans)


def digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(count))


def chars(rng: random.Random, alphabet: str, count: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(count))


def email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    local = rng.choice([f"{first}.{last}", f"{first}_{last}{rng.randint(1, 99)}", f"{first[0]}.{last}+news",
                        f"{first}-{last}", f"{first}{rng.randint(1960, 2005)}", f"{first.upper()}.{last.upper()}"])
    return f"{local}@{rng.choice(DOMAINS)}"


def phone(rng: random.Random) -> str:
    area, exchange, line = f"{rng.randint(2, 9)}{digits(rng, 2)}", digits(rng, 3), digits(rng, 4)
    shapes = [
        f"+1 {area} {exchange} {line}", f"+1-{area}-{exchange}-{line}", f"+1 ({area}) {exchange}-{line}",
        f"({area}) {exchange}-{line}", f"{area}-{exchange}-{line}", f"{area}.{exchange}.{line}",
        f"1-{area}-{exchange}-{line}",
        f"+1{area}{exchange}{line}", f"{area} {exchange} {line}",  # the last only after a cue word (pii.py)
        f"+44 20 {digits(rng, 4)} {digits(rng, 4)}", f"+44 (0)20 {digits(rng, 4)} {digits(rng, 4)}",
        f"020 {digits(rng, 4)} {digits(rng, 4)}", f"07700 {digits(rng, 6)}",
        f"+49 30 {digits(rng, 8)}", f"030 {digits(rng, 8)}", f"089/{digits(rng, 7)}", f"0049 30 {digits(rng, 7)}",
        f"+49 89 {digits(rng, 3)} {digits(rng, 4)}",
        "+33 {} {} {} {} {}".format(rng.randint(1, 9), *(digits(rng, 2) for _ in range(4))),
        "0{} {} {} {} {}".format(rng.randint(1, 9), *(digits(rng, 2) for _ in range(4))),
        f"+31 6 {digits(rng, 8)}", f"+39 06 {digits(rng, 4)} {digits(rng, 4)}",
        f"+34 912 {digits(rng, 3)} {digits(rng, 3)}", f"+91 98765 {digits(rng, 5)}",
        f"+81 3-{digits(rng, 4)}-{digits(rng, 4)}",
    ]
    return rng.choice(shapes)


def ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randint(0, 255)) for _ in range(3)) + f".{rng.randint(1, 254)}"


def ip(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return ipv4(rng)
    groups = [rng.choice(["2001", "2a00", "fe80", "2607", "fd12"]), rng.choice(["db8", "1450", "f8b0", "0"])]
    groups += [f"{rng.randint(0, 0xFFFF):x}" if rng.random() < 0.6 else "0" for _ in range(6)]
    address = ipaddress.IPv6Address(":".join(groups))
    return rng.choice([address.compressed, address.exploded, f"::ffff:{ipv4(rng)}", "2001:db8::1"])


def with_check_digit(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + digits(rng, length - len(prefix) - 1)
    return next(body + d for d in string.digits if luhn_valid(body + d))


def card_number(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("3530", 16), ("36", 14), ("4", 19)])
    return with_check_digit(prefix, length, rng)


def group_card(number: str, separator: str) -> str:
    if len(number) in (14, 15):  # Amex and Diners: 4-6-5 / 4-6-4
        return separator.join((number[:4], number[4:10], number[10:]))
    return separator.join(number[i:i + 4] for i in range(0, len(number), 4))


def credit_card(rng: random.Random) -> str:
    number = card_number(rng)
    return rng.choice([number, group_card(number, " "), group_card(number, "-")]) if len(number) != 13 else number


IBAN_BBANS = {  # country: the BBAN's shape, letters as "A" and digits as "9"
    "DE": "9" * 18, "GB": "AAAA" + "9" * 14, "FR": "9" * 23, "ES": "9" * 20, "IT": "A" + "9" * 22,
    "NL": "AAAA" + "9" * 10, "CH": "9" * 17, "BE": "9" * 12, "PL": "9" * 24, "AT": "9" * 16,
}


def iban_compact(rng: random.Random, country: str | None = None) -> str:
    country = country or rng.choice(sorted(IBAN_BBANS))
    bban = "".join(rng.choice(string.ascii_uppercase if c == "A" else string.digits) for c in IBAN_BBANS[country])
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    compact = f"{country}{check:02d}{bban}"
    assert iban_valid(compact)
    return compact


def group_iban(compact: str) -> str:
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))


def iban(rng: random.Random) -> str:
    compact = iban_compact(rng)
    return rng.choice([compact, group_iban(compact)])


def jwt(rng: random.Random) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    header = part({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"})
    payload = part({"sub": digits(rng, 10), "name": rng.choice(FIRST_NAMES),
                    "iat": rng.randint(1_500_000_000, 1_800_000_000)})
    return f"{header}.{payload}.{chars(rng, BASE64URL, 43)}"


def pem_block(rng: random.Random) -> str:
    label = rng.choice(["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
    lines = [chars(rng, ALNUM + "+/", 64) for _ in range(rng.randint(2, 6))]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def generic_secret_value(rng: random.Random) -> str:
    value = chars(rng, ALNUM + "!#$%^&*", rng.randint(14, 32))
    return value[:-2] + rng.choice(string.ascii_lowercase) + rng.choice(string.digits)  # mixed classes for sure


def token_secret(rng: random.Random) -> str:
    return rng.choice([
        lambda: "AKIA" + chars(rng, UPPER_ALNUM, 16),
        lambda: rng.choice(["ghp_", "gho_", "ghs_"]) + chars(rng, ALNUM, 36),
        lambda: "github_pat_" + chars(rng, ALNUM, 22) + "_" + chars(rng, ALNUM, 59),
        lambda: f"xox{rng.choice('bpoa')}-{digits(rng, 12)}-{digits(rng, 13)}-{chars(rng, ALNUM, 24)}",
        lambda: "sk-" + chars(rng, ALNUM, 45) + rng.choice(string.digits) + "aZ",
        lambda: "sk-proj-" + chars(rng, BASE64URL, 40) + "7q",
        lambda: "AIza" + chars(rng, BASE64URL, 35),
        lambda: jwt(rng),
    ])()


def plant_secret(builder: Builder, rng: random.Random) -> None:
    choice = rng.random()
    if choice < 0.15:
        builder.add("The deploy key, pasted by mistake:\n")
        builder.add(pem_block(rng), "secret")
        builder.add("\nRevoke it.")
    elif choice < 0.5:
        builder.add_template(rng.choice(SECRET_ASSIGNMENTS), generic_secret_value(rng), "secret")
    else:
        builder.add_template(rng.choice(SECRET_TEMPLATES), token_secret(rng), "secret")


PLANTERS = {"email": email, "phone": phone, "ip": ip, "credit_card": credit_card, "iban": iban}


def invalid_card(rng: random.Random) -> str:
    number = card_number(rng)
    wrong = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    return group_card(wrong, rng.choice([" ", "-"])) if len(wrong) != 13 else wrong


def invalid_iban(rng: random.Random) -> str:
    compact = iban_compact(rng)
    wrong = compact[:2] + f"{(int(compact[2:4]) + rng.randint(1, 50)) % 100:02d}" + compact[4:]
    return rng.choice([wrong, group_iban(wrong)])


def long_integer(rng: random.Random) -> str:
    return str(rng.randint(1, 9)) + digits(rng, rng.randint(9, 24))


def negative(rng: random.Random) -> str:
    """One sentence full of things that look like PII but are not."""
    a, b, c, d = (rng.randint(0, 30) for _ in range(4))
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute, second, epoch = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59), rng.randint(15, 17) * 10**8
    hexes = "0123456789abcdef"
    choices = [
        f"Upgrade to {a}.{b}.{c} before the {a}.{b} branch closes.",
        f"Tested on Python 3.{rng.randint(6, 13)}.{c} and 3.{rng.randint(6, 13)}.",
        f"Build v{a}.{b}.{c}.{d} fixed it; version {rng.randint(1, 20)}.0.{rng.randint(10000, 30000)}.{d} did not.",
        f"Released on {year}-{month:02d}-{day:02d}, or {day:02d}/{month:02d}/{year}, or {day:02d}.{month:02d}.{year}.",
        f"The job ran from {hour:02d}:{minute:02d} to {(hour + 2) % 24:02d}:{minute:02d}:{second:02d}.",
        f"The ratio was {rng.uniform(0, 1000):.5f}, about {a + 1},{digits(rng, 3)},{digits(rng, 3)}.{digits(rng, 2)} in all.",
        "See ISBN 978-0-596-52068-7 and ISBN 0-596-52068-9 (ISBN-13: 9780596520687).",
        f"Commit {chars(rng, hexes, 7)} changed the file with SHA-1 {chars(rng, hexes, 40)}.",
        f"The checksum is sha256:{chars(rng, hexes, 64)}.",
        f"Each record gets an id like {uuid.UUID(int=rng.getrandbits(128), version=4)}.",
        "Use @property for computed attributes and @functools.lru_cache(maxsize=128) for caching.",
        "Decorate it with @staticmethod or @dataclass(frozen=True).",
        "Log in as user@localhost or root@buildhost on the test machine.",
        f"The counter overflowed at {long_integer(rng)}; 2**64 is 18446744073709551616.",
        f"The test card {invalid_card(rng)} fails the Luhn check on purpose.",
        f"The IBAN {invalid_iban(rng)} has a wrong checksum.",
        f"Note that {a} + {b} = {a + b} and {rng.randint(100, 999)} - {c} * {d} = {rng.randint(100, 999) - c * d}.",
        f"See pages {rng.randint(10, 400)}-{rng.randint(401, 900)}; the study covers {year - 20}-{year}.",
        f"Ports {rng.randint(1000, 8000)}-{rng.randint(8001, 9000)} are open on localhost:{rng.randint(1000, 9999)}.",
        "Reverse a list with a[::-1] and take every other item with s[1::2]; ::1 is the loopback address.",
        f"The card's MAC address is {':'.join(chars(rng, hexes, 2) for _ in range(6))}.",
        "A std::vector<int> grows by doubling; std::map keeps keys sorted.",
        f"The epoch timestamp {epoch} is in seconds, {epoch}{digits(rng, 3)} in ms.",
        f"The office is at {rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}.",
        f"It allocates {rng.randint(1, 99)} 000 000 bytes, with 0x{chars(rng, hexes, 8)} as the mask.",
        "Install scikit-learn, not sk-learn; the key is AKIA-style only in AWS.",
        "Use token = tokenizer.encode(text) and password = getpass.getpass() in scripts.",
        "Read api_key = os.environ['API_KEY'] and set password: None, or secret = 'changeme'.",
        "The dump starts 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f.",
        f"The OID 1.3.6.1.4.1.{rng.randint(100, 99999)} names the vendor.",
        f"Order #{digits(rng, 8)} shipped to ZIP {digits(rng, 5)}; call extension {digits(rng, 4)}.",
        f"Write to 51 Franklin Street, Boston, MA 0{digits(rng, 4)}-{digits(rng, 4)} USA.",
        f"Set timeout=30 and retries={a}; the function returns -{b}.{c}e-{d}.",
        "Matrix products are written A @ B in NumPy, and x @= y updates in place.",
        "The token: it is an opaque string; see the key: value pairs above.",
    ]
    return rng.choice(choices)


def generate(count: int, seed: int = 0, pii_fraction: float = 0.5) -> list[LabelledText]:
    """``count`` paragraphs of 2-4 sentences; each sentence plants one PII value with probability ``pii_fraction``,
    otherwise it is a hard negative or plain filler."""
    rng = random.Random(seed)
    kinds = [*PLANTERS, "secret"]
    items = []
    for _ in range(count):
        builder = Builder()
        for index in range(rng.randint(2, 4)):
            if index:
                builder.add(rng.choice([" ", " ", "\n", "\n\n"]))
            roll = rng.random()
            if roll < pii_fraction:
                kind = rng.choice(kinds)
                if kind == "secret":
                    plant_secret(builder, rng)
                else:
                    value, template = PLANTERS[kind](rng), rng.choice(POSITIVE_TEMPLATES[kind])
                    if ":" in value:  # an IPv6 address takes brackets before a port, as in URLs
                        template = template.replace("{}:", "[{}]:")
                    builder.add_template(template, value, kind)
            elif roll < pii_fraction + (1 - pii_fraction) * 0.6:
                builder.add(negative(rng))
            else:
                builder.add(rng.choice(FILLER))
        items.append(builder.result())
    return items


@dataclass
class KindScore:
    planted: int = 0
    predicted: int = 0
    correct: int = 0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.planted if self.planted else 1.0


def score(scrubber: PiiScrubber, items: list[LabelledText]) -> tuple[dict[str, KindScore], list[tuple[str, Span, str]]]:
    """Per-kind span-level scores, and the mistakes as (text, span, "missed" or "false positive")."""
    scores = {kind: KindScore() for kind in scrubber.kinds}
    mistakes = []
    for item in items:
        predicted = set(scrubber.find(item.text))
        planted = {span for span in item.spans if span[2] in scores}
        for span in planted:
            scores[span[2]].planted += 1
        for span in predicted:
            scores[span[2]].predicted += 1
        for span in predicted & planted:
            scores[span[2]].correct += 1
        mistakes += [(item.text, span, "missed") for span in planted - predicted]
        mistakes += [(item.text, span, "false positive") for span in predicted - planted]
    return scores, mistakes


def prose(size_bytes: int, seed: int = 0, pii_every: int = 200) -> str:
    """About ``size_bytes`` of ordinary English filler prose, with a PII value planted every ``pii_every`` sentences."""
    rng = random.Random(seed)
    sentences, length, count = [], 0, 0
    while length < size_bytes:
        count += 1
        if count % pii_every == 0:
            kind = rng.choice(sorted(PLANTERS))
            sentence = rng.choice(POSITIVE_TEMPLATES[kind]).format(PLANTERS[kind](rng))
        else:
            sentence = rng.choice(FILLER)
        sentences.append(sentence)
        length += len(sentence) + 1
        if count % 6 == 0:
            sentences.append("\n")
    return " ".join(sentences)


def stdlib_documentation(module_names: list[str]) -> str:
    """Docstrings of some stdlib modules, their public classes, functions and methods: real documentation full
    of numbers and symbols, the hard negatives a scrubber meets in practice."""
    parts = []
    for name in module_names:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member_name, member in sorted(vars(module).items()):
            if member_name.startswith("_") or not (inspect.isclass(member) or inspect.isroutine(member)):
                continue
            parts.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                parts += [inspect.getdoc(method) or "" for method_name, method in sorted(vars(member).items())
                          if not method_name.startswith("_") and inspect.isroutine(method)]
    return "\n\n".join(part for part in parts if part)
