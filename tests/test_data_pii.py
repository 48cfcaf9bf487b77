"""PII scrubbing: exact replacements, hard negatives, measured precision/recall, and real documentation."""

from __future__ import annotations

from collections import Counter

import pytest

from lmforge.config import PII_KINDS
from lmforge.data.pii import PLACEHOLDERS, PiiScrubber, iban_valid, luhn_valid
from lmforge.data.pii_testset import generate, score, stdlib_documentation
from lmforge.errors import LmforgeError

scrub = PiiScrubber(PII_KINDS)


@pytest.mark.parametrize("text, expected", [
    ("Write to jane.doe+news@mail.example.co.uk.", "Write to <EMAIL>."),
    ("Maintainer: <JANE_DOE42@Example.ORG>", "Maintainer: <<EMAIL>>"),
    ("Call (555) 123-4567 or 555.123.4567 or 1-555-123-4567.", "Call <PHONE> or <PHONE> or <PHONE>."),
    ("UK +44 (0)20 7946 0958, DE +49 30 12345678, FR 06 12 34 56 78.", "UK <PHONE>, DE <PHONE>, FR <PHONE>."),
    ("Dial 0049 30 1234567 or +15551234567 or 089/1234567.", "Dial <PHONE> or <PHONE> or <PHONE>."),
    ("Call me on 555 123 4567; the table reads 256 512 1024.", "Call me on <PHONE>; the table reads 256 512 1024."),
    ("Hosts 192.168.1.10:8080 and [2001:db8::1]:443.", "Hosts <IP>:8080 and [<IP>]:443."),
    ("Mapped ::ffff:192.0.2.1 and fe80::1ff:fe23:4567:890a here.", "Mapped <IP> and <IP> here."),
    ("Cards 4111 1111 1111 1111, 5500-0000-0000-0004 and 378282246310005.",
     "Cards <CREDIT_CARD>, <CREDIT_CARD> and <CREDIT_CARD>."),
    ("Amex as printed: 3782 822463 10005.", "Amex as printed: <CREDIT_CARD>."),
    ("IBAN DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432.", "IBAN <IBAN> or <IBAN>."),
    ("Keys AKIAIOSFODNN7EXAMPLE and AIzaSyA1234567890abcdefghijklmnopqrstuv.", "Keys <SECRET> and <SECRET>."),
    ("Token ghp_" + "aB3" * 12 + " leaked.", "Token <SECRET> leaked."),
    ("Slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx.", "Slack <SECRET>."),
    ("OpenAI sk-proj-AbC123dEf456GhI789jKl012MnO345 key.", "OpenAI <SECRET> key."),
    ("JWT eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok",
     "JWT <SECRET> ok"),
    ('password = "s3cr3tP4ssw0rd!X"; DB_PASSWORD=hJ8kL2mN9pQ4rS', 'password = "<SECRET>"; DB_PASSWORD=<SECRET>'),
    ('{"client_secret": "Zm9vYmFyYmF6cXV4MTIz"}', '{"client_secret": "<SECRET>"}'),
    ("Authorization: Bearer abcDEF123456ghiJKL789", "Authorization: Bearer <SECRET>"),
])
def test_each_kind_is_replaced_exactly(text, expected):
    assert scrub(text)[0] == expected


def test_a_private_key_block_is_replaced_whole_even_when_cut_off():
    block = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2\nbase64+/==\n-----END RSA PRIVATE KEY-----"
    assert scrub(f"Key:\n{block}\nDone.") == ("Key:\n<SECRET>\nDone.", {"secret": 1})
    cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAABG5vbmUAAAAEbm9uZQ"
    assert scrub(f"Pasted:\n{cut}\n\nThat was all.") == ("Pasted:\n<SECRET>\n\nThat was all.", {"secret": 1})


@pytest.mark.parametrize("text", [
    "Use @property or @functools.lru_cache(maxsize=128) on the method.",
    "Log in as user@localhost or root@buildhost.",
    "Python 3.11.4 was released on 2024-03-15 at 10:30:00 (15/03/2024, 15.03.2024).",
    "Build v1.2.3.4 fixed it; version 10.0.19041.1 did not; release 2.0.1.15 too.",
    "See ISBN 978-0-596-52068-7 and ISBN 0-596-52068-9 (ISBN-13: 9780596520687).",
    "Commit 3f2a9c1 has SHA-1 0a4d55a8d778e5022fab701977c5d840bbc486d0.",
    "Each id looks like 123e4567-e89b-12d3-a456-426614174000.",
    "2**64 = 18446744073709551616 and the counter stopped at 1234567890123456789.",
    "The test card 4111 1111 1111 1112 fails the Luhn check.",
    "The IBAN DE88 3704 0044 0532 0130 00 has a wrong checksum.",
    "Note that 12 + 34 = 46 and 100 - 5 * 3 = 85; see pages 123-456 and 1990-2020.",
    "Reverse with a[::-1], take s[1::2]; ::1 is the loopback; std::vector<int> grows.",
    "The MAC address 00:1a:2b:3c:4d:5e and ports 8000-8080 on localhost:8080.",
    "Epoch 1710500000 seconds or 1710500000123 ms at 51.5074, -0.1278.",
    "Boston, MA 02110-1301 USA; order #12345678; ZIP 90210; extension 1234.",
    "The dump starts 00 01 02 03 04 05 06 07 08 09 0a 0b.",
    "The OID 1.3.6.1.4.1.311 names the vendor; 1 000 000 bytes; mask 0x7fffffff.",
    "Use token = tokenizer.encode(text) and password = getpass.getpass().",
    "Read api_key = os.environ['API_KEY']; set password: None or secret = 'changeme'; api_key: YOUR_API_KEY.",
    "Install scikit-learn, not sk-learn; A @ B multiplies matrices.",
])
def test_hard_negatives_are_left_alone(text):
    assert scrub(text) == (text, {})


def test_counts_are_per_kind_and_only_kinds_found():
    text = "Mail a@example.com or b@example.org, call +1 555 123 4567, never 3.11.4."
    assert scrub(text) == ("Mail <EMAIL> or <EMAIL>, call <PHONE>, never 3.11.4.", {"email": 2, "phone": 1})
    assert scrub("Nothing to see here.") == ("Nothing to see here.", {})
    assert scrub("") == ("", {})


def test_overlapping_kinds_are_replaced_whole_in_the_documented_order():
    # An e-mail made of a phone number, an IBAN whose digits could be read as a card, an IPv4 inside IPv6,
    # a secret value holding an e-mail: each becomes one placeholder, with nothing left over.
    assert scrub("Reply to 555-123-4567@example.com now.")[0] == "Reply to <EMAIL> now."
    assert scrub("Pay NL91 ABNA 0417 1643 00 today.")[0] == "Pay <IBAN> today."
    assert scrub("Host ::ffff:10.1.2.3 is mapped.")[0] == "Host <IP> is mapped."
    assert scrub("password=jane@Example.com99X")[0] == "password=<SECRET>"
    assert scrub("Call +1 (555) 123-4567.")[0] == "Call <PHONE>."


def test_only_the_chosen_kinds_are_scrubbed():
    text = "Mail a@example.com or call (555) 123-4567 from 10.0.0.1."
    assert PiiScrubber(["email"])(text) == ("Mail <EMAIL> or call (555) 123-4567 from 10.0.0.1.", {"email": 1})
    assert PiiScrubber(["phone", "ip"])(text)[0] == "Mail a@example.com or call <PHONE> from <IP>."
    assert PiiScrubber([])(text) == (text, {})
    with pytest.raises(LmforgeError, match="unknown PII kind"):
        PiiScrubber(["email", "ssn"])


def test_checksums_against_published_examples():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82WEST12345698765432") and iban_valid("DE89370400440532013000")
    assert not iban_valid("GB82WEST12345698765433")


def test_precision_and_recall_per_kind_on_the_generated_set():
    items = generate(3000, seed=0)
    scores, mistakes = score(scrub, items)
    print("\nkind          planted  found  precision  recall")
    for kind, result in scores.items():
        print(f"{kind:12s}  {result.planted:7d}  {result.correct:5d}  {result.precision:9.4f}  {result.recall:6.4f}")
    for kind, result in scores.items():
        assert result.planted > 400, kind
        assert result.precision >= 0.95 and result.recall >= 0.95, (kind, mistakes[:5])
    # Replacements leave nothing of what they replace, and scrubbing twice changes nothing more.
    for item in items[:500]:
        scrubbed, counts = scrub(item.text)
        spans = scrub.find(item.text)
        assert sum(counts.values()) == len(spans)
        for start, end, _ in spans:
            assert item.text[start:end] not in scrubbed
        assert scrub(scrubbed)[0] == scrubbed


def test_real_documentation_stays_mostly_untouched():
    text = stdlib_documentation(["ipaddress", "email", "email.utils", "re", "datetime", "decimal", "time", "calendar",
                                 "uuid", "struct", "fractions", "statistics", "hashlib", "argparse", "json",
                                 "urllib.parse", "textwrap"])
    assert len(text) > 50_000
    spans = scrub.find(text)
    print(f"\n{len(spans)} replacements in {len(text):,} characters of stdlib documentation:")
    for start, end, kind in spans:
        print(f"  {kind}: {text[start:end]!r}")
    # ipaddress documents example addresses (192.0.2.0, 2001:db8::1000, ...) and email.utils an example
    # Message-ID: real IP and e-mail shapes by any rule. No version, date, hash or number becomes PII.
    by_kind = Counter(kind for _, _, kind in spans)
    assert set(by_kind) <= {"ip", "email"} and by_kind["ip"] <= 25 and by_kind["email"] <= 2
    assert sum(end - start for start, end, _ in spans) < 0.01 * len(text)


def test_placeholders_cover_every_kind():
    assert set(PLACEHOLDERS) == set(PII_KINDS)
