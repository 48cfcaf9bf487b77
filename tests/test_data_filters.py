"""Repair, language identification, quality heuristics and the word-list filter, on real text."""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json.decoder
import pickle
import random
import shlex
import string
import textwrap
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import LanguageConfig, NormalizeConfig, QualityConfig, ToxicityConfig
from lmforge.data.clean import clean_text
from lmforge.data.language import DEPTH, MAX_CHARS, LanguageFilter, identify_language, identify_languages, model
from lmforge.data.normalize import Normalizer, ftfy_config
from lmforge.data.quality import QualityFilter, analyse_words
from lmforge.data.toxicity import WordListFilter
from lmforge.errors import LmforgeError

REPO = Path(__file__).resolve().parents[1]

PROSE = clean_text("""
The old railway line that once linked the two valleys closed in the spring of 1962, and for years afterwards the
cutting was left to brambles and foxes. Walkers who knew the area would still follow it on summer evenings, because
it was the only level path between the villages, and because the stone bridges built by the railway were more
beautiful than anything else in the district.

In the 1990s a group of volunteers began to clear the route. They had no money at first, only a borrowed trailer and
a great deal of patience, but the county council noticed their work and agreed to pay for gravel, gates and a few
benches. Within ten years the path had become a small attraction of its own, with a cafe in the former station
building and a timetable of guided walks on Sunday mornings.

Not everyone was pleased. Some farmers worried that visitors would leave gates open or let their dogs chase sheep,
and a long argument about parking filled the letters page of the local paper for most of one winter. In the end a
compromise was found: a small car park at each end, signs asking people to keep dogs on a lead, and a promise that
the path would close during lambing season.
""")

PARAGRAPHS = {
    "en": "The river had risen overnight, and by morning the lower fields were under water. Farmers gathered at the "
          "bridge to watch the current carry branches and fence posts downstream, talking quietly about the harvest "
          "they had hoped to bring in before the end of the week. Nobody could remember a flood this early in the year.",
    "de": "Der Fluss war über Nacht gestiegen, und am Morgen standen die unteren Felder unter Wasser. Die Bauern "
          "versammelten sich an der Brücke und sahen zu, wie die Strömung Äste und Zaunpfähle mit sich riss. Sie "
          "sprachen leise über die Ernte, die sie noch vor dem Ende der Woche einbringen wollten.",
    "fr": "La rivière avait monté pendant la nuit, et au matin les champs du bas étaient sous l'eau. Les paysans se "
          "sont rassemblés sur le pont pour regarder le courant emporter des branches et des piquets de clôture, en "
          "parlant à voix basse de la récolte qu'ils espéraient rentrer avant la fin de la semaine.",
    "es": "El río había crecido durante la noche y por la mañana los campos de abajo estaban bajo el agua. Los "
          "campesinos se reunieron en el puente para ver cómo la corriente arrastraba ramas y postes de la cerca, "
          "hablando en voz baja de la cosecha que esperaban recoger antes del final de la semana.",
    "ru": "За ночь река поднялась, и к утру нижние поля оказались под водой. Крестьяне собрались у моста и смотрели, "
          "как течение уносит ветки и столбы от забора. Они тихо говорили об урожае, который надеялись собрать до "
          "конца недели. Никто не помнил такого раннего наводнения.",
    "zh": "河水在夜里涨了起来，到了早上，低处的田地都被水淹没了。农民们聚集在桥上，看着水流把树枝和篱笆桩冲向下游，"
          "低声谈论着他们原本希望在周末之前收割的庄稼。谁也不记得一年中这么早就发过洪水。",
    "ja": "川は夜のうちに増水し、朝には低い畑が水に浸かっていた。農家の人々は橋に集まり、流れが枝や柵の杭を下流へ運んで"
          "いくのを見ながら、週末までに取り入れたいと思っていた作物について小声で話し合った。",
}


# Repair and normalisation


def test_mojibake_is_repaired_and_reported() -> None:
    normalize = Normalizer(NormalizeConfig())
    assert normalize("Un cafÃ© crÃ¨me, s'il vous plaÃ®t.") == ("Un café crème, s'il vous plaît.", ["mojibake"])
    assert normalize("She said â€œquotedâ€\x9d and left.") == ("She said “quoted” and left.", ["mojibake"])
    # A no-break space lost on the way ("Ã" + space instead of "Ã" + 0xA0) is restored too.
    assert normalize("voilÃ  le travail") == ("voilà le travail", ["mojibake"])


@pytest.mark.parametrize("word", ["café", "naïve", "Jürgen", "señor", "Ελλάδα", "Москва", "日本語", "😀", "“quoted”", "€100"])
def test_quick_check_never_skips_what_ftfy_repairs(word: str) -> None:
    """UTF-8 read in each single-byte encoding ftfy knows: the Normalizer gives exactly ftfy's repair."""
    import ftfy
    from ftfy.chardata import CHARMAP_ENCODINGS

    normalize = Normalizer(NormalizeConfig())
    for encoding in CHARMAP_ENCODINGS:
        broken = f"The word {word.encode('utf-8').decode(encoding)} appears here."
        repaired = ftfy.fix_text(broken, ftfy_config())
        expected = clean_text(repaired) if repaired != broken else broken
        assert normalize(broken)[0] == expected, encoding
        if encoding in ("latin-1", "sloppy-windows-1252"):
            assert expected == f"The word {word} appears here."


def test_clean_text_in_any_language_is_left_alone() -> None:
    normalize = Normalizer(NormalizeConfig())
    for text in [*PARAGRAPHS.values(), PROSE, "“Don’t” — he said… naïve café, 5 €, © 2024, AT&T <b>"]:
        assert normalize(text) == (text, [])


def test_nfkc_lowercase_and_emoji_options() -> None:
    assert Normalizer(NormalizeConfig())("ﬁnancial ＡＢＣ１２３") == ("ﬁnancial ＡＢＣ１２３", [])
    assert Normalizer(NormalizeConfig(unicode_form="NFKC"))("ﬁnancial ＡＢＣ１２３ x\u00a0") == ("financial ABC123 x", ["unicode_form"])
    assert Normalizer(NormalizeConfig(lowercase=True))("Hello World ÄÖÜ") == ("hello world äöü", ["lowercase"])
    to_text = Normalizer(NormalizeConfig(emoji_to_text=True))
    assert to_text("I ❤️ Python 😀 👍🏽") == ("I :red_heart: Python :grinning_face: :thumbs_up_medium_skin_tone:", ["emoji"])
    # Text-style symbols are ordinary characters, not emoji.
    assert to_text("© 2024 Acme™, see ↔") == ("© 2024 Acme™, see ↔", [])
    everything = Normalizer(NormalizeConfig(unicode_form="NFKC", lowercase=True, emoji_to_text=True))
    assert everything("CafÃ© ＯＰＥＮ 😀") == ("café open :grinning_face:", ["mojibake", "unicode_form", "emoji", "lowercase"])


def test_html_entities_are_unescaped_outside_markup() -> None:
    normalize = Normalizer(NormalizeConfig())
    assert normalize("AT&amp;T and Barnes &amp; Noble") == ("AT&T and Barnes & Noble", ["mojibake"])
    assert normalize("Write <b>&amp;</b> for an ampersand.") == ("Write <b>&amp;</b> for an ampersand.", [])
    assert Normalizer(NormalizeConfig(fix_mojibake=False))("cafÃ© &amp;") == ("cafÃ© &amp;", [])


# Language identification


@pytest.mark.parametrize("language", sorted(PARAGRAPHS))
def test_languages_are_identified_with_confidence(language: str) -> None:
    code, score = identify_language(PARAGRAPHS[language])
    assert code == language and score > 0.95


def test_scores_match_py3langid() -> None:
    """The vectorised walk is an exact rewrite: same label and probability as py3langid itself."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    rng = random.Random(0)
    texts = [*PARAGRAPHS.values(), PROSE, "Taxi Hotel Pizza", "OK", "ab", "x", "ÉCOLE NORMALE SUPÉRIEURE", "mixed Москва 東京 text 😀"]
    texts += ["".join(rng.choice(string.printable + "äöüßéèàçñøåæœ…—“”€") for _ in range(rng.randint(1, 300))) for _ in range(40)]
    for text in texts:
        if not any(char.isalpha() for char in text[:MAX_CHARS]):
            continue
        expected = dict(reference.rank(text[:MAX_CHARS]))
        language, score = identify_language(text)
        best = max(expected.values())
        # Float sums in another order may swap two labels that tie (near-uniform scores on letter soup).
        assert expected[language] == pytest.approx(best, abs=1e-4) and score == pytest.approx(best, abs=1e-4), text
        if best > 0.5:
            assert language == max(expected, key=expected.get)


def test_model_states_spell_at_most_depth_bytes() -> None:
    """The vectorised walk relies on every automaton state being reachable in DEPTH bytes (breadth-first search)."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE
    from py3langid.modelio import load_model

    *_, next_state, rows, _ = load_model(MODEL_DIR / MODEL_FILE)
    next_state, row_start = np.asarray(next_state, dtype=np.int64), np.asarray(rows, dtype=np.int64) << 8
    depth = np.full(len(row_start), -1)
    depth[0], frontier, steps = 0, np.array([0]), 0
    while len(frontier):
        steps += 1
        reached = np.unique(next_state[(row_start[frontier][:, None] + np.arange(256)).ravel()])
        frontier = reached[depth[reached] < 0]
        depth[frontier] = steps
    assert (depth >= 0).all() and depth.max() <= DEPTH
    # The model's tables are the automaton's, laid out by row offset.
    m = model()
    assert m.start == row_start[0] and (m.next_offset == row_start[next_state]).all()
    assert (m.after_two_bytes.reshape(256, 256)[7] == m.next_offset[m.next_offset[m.start + 7] + np.arange(256)]).all()


def test_batch_identification_equals_one_document_at_a_time() -> None:
    rng = random.Random(3)
    texts = [*PARAGRAPHS.values(), PROSE, "", "x", "ab", "OK", "12345 !!", "ÉCOLE NORMALE", "mixed Москва 東京 😀"]
    texts += ["".join(rng.choice(string.printable + "äöüßéèàçñøåæœ…—“”€") for _ in range(rng.randint(0, 300)))
              for _ in range(60)]
    texts += [(PARAGRAPHS["de"] + " ") * 30]  # longer than MAX_CHARS
    rng.shuffle(texts)
    single = [identify_language(text) for text in texts]
    batch = identify_languages(texts)
    assert [language for language, _ in batch] == [language for language, _ in single]
    assert np.allclose([score for _, score in batch], [score for _, score in single], rtol=0, atol=1e-6)
    assert identify_languages(["12 34", "--"]) == [("und", 0.0)] * 2 and identify_languages([]) == []
    english_only = LanguageFilter(LanguageConfig(keep=["en"], min_score=0.5))
    assert english_only.batch(texts) == [(english_only(text)[0], *result) for text, result in zip(texts, batch)]


def test_only_the_first_characters_are_judged_and_letterless_text_is_undetermined() -> None:
    english = (PARAGRAPHS["en"] + " ") * (MAX_CHARS // len(PARAGRAPHS["en"]) + 1)
    assert identify_language(english + PARAGRAPHS["de"] * 20)[0] == "en"
    assert identify_language("1234 5678 -- !!! 3.14") == ("und", 0.0)
    assert identify_language("") == ("und", 0.0)


def test_language_filter_keep_and_uncertain_rules() -> None:
    english_only = LanguageFilter(LanguageConfig(keep=["en"], min_score=0.5))
    assert english_only(PARAGRAPHS["en"])[:2] == (None, "en")
    reason, language, score = english_only(PARAGRAPHS["de"])
    assert (reason, language) == ("language_not_kept", "de") and score > 0.95
    keep_all = LanguageFilter(LanguageConfig(keep=[], min_score=0.5))
    assert [keep_all(text)[0] for text in PARAGRAPHS.values()] == [None] * len(PARAGRAPHS)
    reason, _, score = keep_all("Taxi Hotel Pizza")
    assert reason == "language_uncertain" and score < 0.5
    with pytest.raises(LmforgeError, match="english"):
        LanguageFilter(LanguageConfig(keep=["english"]))


# Quality heuristics


def random_words(count: int, rng: random.Random, length: int = 5) -> list[str]:
    """Distinct lowercase nonsense words of one length: no stop words, no accidental repeats."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(length)))
    return sorted(words, key=lambda _: rng.random())


def as_lines(words: list[str], per_line: int = 10) -> str:
    return "\n".join(" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line))


def with_phrase(total: int, phrase_length: int, copies: int, seed: int = 0) -> str:
    """`total` five-letter words in which one phrase of `phrase_length` words occurs `copies` times, apart."""
    rng = random.Random(seed)
    words = random_words(total - phrase_length * (copies - 1), rng)
    phrase, filler = words[:phrase_length], words[phrase_length:]
    gap = len(filler) // copies
    out: list[str] = []
    for copy in range(copies):
        out += phrase + filler[copy * gap:(copy + 1) * gap]
    return as_lines(out + filler[copies * gap:])


def reference_repetition_reason(words: list[str], config: QualityConfig) -> str | None:
    """Gopher's repetition rules written plainly with tuples, as the reference for the vectorised version."""
    characters = sum(map(len, words))
    for n, limit in zip((2, 3, 4), config.max_top_ngram_fraction):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        top = max(grams.values(), default=0)
        longest = max((len("".join(gram)) for gram, count in grams.items() if count == top), default=0)
        if top >= 2 and top * longest / characters > limit:
            return f"quality_top_{n}gram"
    for n, limit in zip(range(5, 11), config.max_duplicate_ngram_fraction):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        covered = {i + j for i in range(len(words) - n + 1) if grams[tuple(words[i:i + n])] > 1 for j in range(n)}
        if sum(len(words[i]) for i in covered) / characters > limit:
            return f"quality_duplicate_{n}gram"
    return None


def test_normal_prose_is_kept_untouched() -> None:
    assert QualityFilter(QualityConfig())(PROSE) == (PROSE, None, 0)
    assert QualityFilter(QualityConfig())(PARAGRAPHS["en"] + " " + PROSE, "en") == (PARAGRAPHS["en"] + " " + PROSE, None, 0)


def test_each_document_rule_rejects_a_document_built_to_break_it() -> None:
    check = QualityFilter(QualityConfig())
    sentences = [sentence + "." for sentence in PROSE.replace("\n", " ").split(". ")]
    prose_words = PROSE.split()
    rng = random.Random(1)
    cases = {
        "quality_too_few_words": "A short note.",
        "quality_mean_word_length": " ".join(["I am to go, so we do it as we go."] * 3 + ["a b c d e f g h i j k l"] * 3),
        "quality_symbol_ratio": PROSE + " " + " ".join(f"#tag{i}" for i in range(len(prose_words) // 8)),
        "quality_ellipsis_lines": "\n".join(sentence[:-1] + "..." for sentence in sentences),
        "quality_bullet_lines": "\n".join("• " + sentence for sentence in sentences),
        "quality_alpha_words": " ".join(f"{word} {1900 + i}" if i % 3 == 0 else word for i, word in enumerate(prose_words)),
        "quality_stop_words": as_lines(random_words(80, rng, length=6)),
        "quality_duplicate_lines": "\n".join(sentences[:10] + [sentences[0]] * 5),
        "quality_duplicate_paragraphs": "\n\n".join([*PROSE.split("\n\n"), sentences[3], sentences[3], sentences[3]]),
    }
    for reason, text in cases.items():
        assert check(text)[1] == reason, reason
    assert QualityFilter(QualityConfig(max_words=100))(PROSE)[1] == "quality_too_many_words"
    long_words = as_lines(random_words(60, rng, length=12) + ["the", "and"])
    assert check(long_words)[1] == "quality_mean_word_length"
    # The stop-word rule is for English (or unlabelled) text only.
    assert check(cases["quality_stop_words"], "de")[1] is None


@pytest.mark.parametrize(("reason", "text"), [
    # Five-letter words: a phrase of n words repeated k times covers k*n/total of the characters.
    ("quality_top_2gram", with_phrase(100, 2, 12)),  # 0.24 > 0.20
    ("quality_top_3gram", with_phrase(100, 3, 8)),  # 2-grams 0.16 <= 0.20, 3-grams 0.24 > 0.18
    ("quality_top_4gram", with_phrase(100, 4, 5)),  # 0.10, 0.15, then 0.20 > 0.16
    ("quality_duplicate_5gram", with_phrase(60, 5, 2)),  # 10/60 covered > 0.15
    ("quality_duplicate_6gram", with_phrase(83, 6, 2)),  # 12/83 = 0.145
    ("quality_duplicate_7gram", with_phrase(104, 7, 2)),  # 14/104 = 0.135
    ("quality_duplicate_8gram", with_phrase(128, 8, 2)),  # 0.125
    ("quality_duplicate_9gram", with_phrase(157, 9, 2)),  # 0.115
    ("quality_duplicate_10gram", with_phrase(190, 10, 2)),  # 0.105
])
def test_each_repetition_rule_rejects_a_document_built_to_break_it(reason: str, text: str) -> None:
    # French label: the stop-word rule stays out of the way of these nonsense words.
    assert QualityFilter(QualityConfig())(text, "fr")[1] == reason
    assert reference_repetition_reason(text.split(), QualityConfig()) == reason


def test_repetition_rules_agree_with_a_plain_reference() -> None:
    """Random documents with planted repeats of random lengths and counts, judged both ways."""
    config = QualityConfig(min_mean_word_length=0)  # short words are part of the sample
    check = QualityFilter(config)
    rng = random.Random(7)
    reasons = Counter()
    for _ in range(300):
        words = random_words(rng.randint(50, 250), rng, length=rng.randint(3, 8))
        words = [word[: rng.randint(2, len(word))] if rng.random() < 0.3 else word for word in words]  # mixed lengths
        for _ in range(rng.randint(0, 4)):
            length = rng.randint(1, 12)
            start = rng.randrange(len(words) - length)
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(words))
                words[at:at] = words[start:start + length]
        expected = reference_repetition_reason(words, config)
        assert check(" ".join(words), "fr")[1] == expected, words
        reasons[expected] += 1
    assert len(reasons) >= 6  # the sample reaches many different rules, not only "keep"


def test_words_are_whitespace_separated_tokens() -> None:
    for text in [PROSE, *PARAGRAPHS.values(), "tab\tseparated\u00a0no-break\u3000ideographic 😀emoji 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end"]:
        words = analyse_words(text)
        tokens = text.split()
        assert words.count == len(tokens) and words.lengths.tolist() == [len(token) for token in tokens]
        by_token = {}
        for token, value in zip(tokens, words.hashes.tolist()):
            assert by_token.setdefault(token, value) == value
        assert len(set(by_token.values())) == len(by_token)
    words = analyse_words("It's 1999, (really)! #42")
    assert (words.punctuation, words.with_letters) == (6, 2)


def test_c4_boilerplate_lines_are_removed_and_lorem_ipsum_rejected() -> None:
    check = QualityFilter(QualityConfig())
    paragraphs = PROSE.split("\n\n")
    page = "\n\n".join([
        "Please enable JavaScript to view this site.", paragraphs[0],
        "This website uses cookies to improve your experience. Read our Privacy Policy.", paragraphs[1],
        "Terms of Use", paragraphs[2],
    ])
    assert check(page) == (PROSE, None, 3)
    language_talk = PROSE + "\nJavaScript and Python are both used to write this kind of guide."
    assert check(language_talk) == (language_talk, None, 0)
    assert check(PROSE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.")[1] == "quality_lorem_ipsum"
    assert check("JavaScript is disabled in your browser.\n\nWe use cookies.") == ("", "quality_empty_after_line_filters", 2)
    untouched = QualityFilter(QualityConfig(c4_boilerplate_lines=False))(page)
    assert untouched[0] == page and untouched[2] == 0


def test_c4_terminal_punctuation_option_drops_unfinished_lines() -> None:
    one_line_paragraphs = "\n\n".join(paragraph.replace("\n", " ") for paragraph in PROSE.split("\n\n"))
    text = one_line_paragraphs + "\n\nShare this article\nRelated posts"
    assert QualityFilter(QualityConfig())(text) == (text, None, 0)
    assert QualityFilter(QualityConfig(c4_terminal_punctuation=True))(text) == (one_line_paragraphs, None, 2)
    # Hard-wrapped text loses every line that ends mid-sentence, which is why the option is off by default.
    assert QualityFilter(QualityConfig(c4_terminal_punctuation=True))(PROSE)[1] == "quality_too_few_words"


def bare_code(function) -> str:
    """The source of a stdlib function without its docstrings and comments."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.FunctionDef) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return clean_text(ast.unparse(tree))


def test_code_is_kept_only_with_its_prose() -> None:
    """Bare code is rejected: operators and numbers are not words (alpha-word rule), identifiers are not stop
    words, and `else:`/`break` lines repeat. The same functions with their docstrings and comments, or code
    quoted in prose, are kept."""
    check = QualityFilter(QualityConfig())
    wrap_chunks, scanstring, dedent = textwrap.TextWrapper._wrap_chunks, json.decoder.py_scanstring, textwrap.dedent
    assert check(bare_code(wrap_chunks))[1] == "quality_alpha_words"
    assert check(bare_code(scanstring))[1] == "quality_alpha_words"
    assert check(bare_code(dedent))[1] == "quality_stop_words"
    assert check(bare_code(shlex.shlex.read_token))[1] == "quality_duplicate_lines"
    for function in (wrap_chunks, scanstring, dedent):
        assert check(clean_text(textwrap.dedent(inspect.getsource(function))))[1] is None
    quoted = PROSE + "\n\n" + textwrap.indent(bare_code(dedent), "    ")
    assert check(quoted)[1] is None


def test_bad_repetition_settings_are_reported() -> None:
    with pytest.raises(LmforgeError, match="max_top_ngram_fraction"):
        QualityFilter(QualityConfig(max_top_ngram_fraction=[0.2, 0.2]))
    with pytest.raises(LmforgeError, match="max_duplicate_ngram_fraction"):
        QualityFilter(QualityConfig(max_duplicate_ngram_fraction=[0.1]))


# Word-list filter


def test_packaged_list_hits_whole_words_only() -> None:
    check = WordListFilter(ToxicityConfig(enabled=True))
    assert check("Scunthorpe United signed a therapist, an assassin and a cocktail expert. " + PROSE) == (None, 0)
    profane = "What the FUCK is this? " + " ".join(PROSE.split()[:96])  # 1 of 100 words
    assert check(profane) == ("toxic", 1)
    assert check("Well, fuck. " + PROSE) == (None, 1)  # 1 of ~330 words is under the default 0.5%
    assert check("He called him a son of a bitch.") == ("toxic", 2)  # the phrase and the word inside it


def test_user_list_with_phrases_and_thresholds(tmp_path: Path) -> None:
    word_list = tmp_path / "mine.txt"
    word_list.write_text("# words our client does not want\n\nWidget\nquarterly   earnings\n", encoding="utf-8")
    config = ToxicityConfig(enabled=True, packaged_list=False, word_lists=[str(word_list)], max_fraction=0.1)
    check = WordListFilter(config)
    ten_words = "Our quarterly earnings, announced today, beat every widget forecast."
    assert check(ten_words) == ("toxic", 2)  # 2 of 9 words
    assert check("The quarterly report on earnings and one widget " + PROSE) == (None, 1)  # not the phrase
    assert check("Widgets everywhere, widgetry " + PROSE) == (None, 0)
    at_most_one = WordListFilter(config.model_copy(update={"max_fraction": 1.0, "max_hits": 1}))
    assert at_most_one(PROSE + " A widget.")[0] is None
    assert at_most_one(PROSE + " A widget. Another widget.") == ("toxic", 2)
    exactly_at_limit = WordListFilter(config.model_copy(update={"max_fraction": 0.25}))
    assert exactly_at_limit("widget one two three") == (None, 1)  # 1/4 is not above 0.25


def test_unreadable_word_lists_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(LmforgeError, match="nope.txt"):
        WordListFilter(ToxicityConfig(word_lists=[str(missing)]))
    with pytest.raises(LmforgeError, match=str(tmp_path.name)):
        WordListFilter(ToxicityConfig(word_lists=[str(tmp_path)]))
    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LmforgeError, match="list.bin"):
        WordListFilter(ToxicityConfig(word_lists=[str(binary)]))


def test_packaged_list_is_shipped_and_sized() -> None:
    path = REPO / "lmforge" / "data" / "wordlists" / "toxic_en.txt"
    entries = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    assert 100 <= len(entries) <= 200 and len(entries) == len(set(entries))
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmforge"]
    assert any(fnmatch.fnmatch("data/wordlists/toxic_en.txt", pattern) for pattern in patterns)


def test_filters_survive_pickling_for_worker_processes() -> None:
    filters = [Normalizer(NormalizeConfig(emoji_to_text=True)), LanguageFilter(LanguageConfig()),
               QualityFilter(QualityConfig()), WordListFilter(ToxicityConfig(enabled=True))]
    for original in filters:
        copy = pickle.loads(pickle.dumps(original))
        assert copy(PROSE) == original(PROSE)
