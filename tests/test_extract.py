"""HTML main-text extraction and Markdown/RST markup stripping (lmforge.data.extract), on pages and texts written here."""

from __future__ import annotations

import pytest

from lmforge.data.extract import HTML_METHODS, extract_html, strip_markup
from lmforge.data.readers import SkippedFile
from lmforge.errors import LmforgeError

ARTICLE_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Why rivers meander | The Field Notes</title>
  <style>body { font-family: serif; }</style>
  <script>window.analytics = {track: function () {}};</script>
</head>
<body>
  <div id="cookie-banner" class="cookie-banner">We use cookies to improve your experience. <button>Accept all</button></div>
  <header class="site-header">
    <a href="/" class="logo">The Field Notes</a>
    <nav class="main-nav"><ul><li><a href="/">Home</a></li><li><a href="/archive">Archive</a></li>
      <li><a href="/subscribe">Subscribe</a></li></ul></nav>
  </header>
  <div class="layout">
    <main>
      <article>
        <h1>Why rivers meander</h1>
        <p class="byline">By Ada Brook, 3 March 2024</p>
        <p>A river that flows across a flat valley rarely runs straight. Small bends grow because water on the
        outside of a bend moves faster and erodes the bank, while slower water on the inside drops its sand and gravel.</p>
        <p>Over decades the bends migrate downstream and sideways. When two loops touch, the river cuts through the
        narrow neck and leaves an oxbow lake behind, a curved pond that slowly fills with silt.</p>
        <h2>Measuring sinuosity</h2>
        <p>Geologists describe how much a river wanders with its <em>sinuosity</em>: the length of the channel divided
        by the straight distance between its ends.</p>
        <table>
          <tr><th>River</th><th>Sinuosity</th></tr>
          <tr><td>Mississippi</td><td>1.9</td></tr>
          <tr><td>Rhine</td><td>1.2</td></tr>
        </table>
        <p>The ratio is easy to compute once the channel is traced as a list of points along its centre line:</p>
        <pre><code>def sinuosity(points):
    channel = sum(distance(a, b) for a, b in zip(points, points[1:]))
    return channel / distance(points[0], points[-1])
</code></pre>
        <p>Values above 1.5 are called meandering; below that the river is sinuous or straight, and engineers who
        straighten rivers often find that the bends slowly come back.</p>
      </article>
    </main>
    <aside class="sidebar">
      <h3>Related stories</h3>
      <ul><li><a href="/deltas">How deltas are built</a></li><li><a href="/floods">Living with floods</a></li></ul>
    </aside>
  </div>
  <footer class="site-footer"><p>Copyright 2024 The Field Notes. All rights reserved.</p><a href="/privacy">Privacy policy</a></footer>
</body>
</html>
"""

ARTICLE_PARAGRAPHS = [
    "Why rivers meander",
    "A river that flows across a flat valley rarely runs straight. Small bends grow because water on the outside of a "
    "bend moves faster and erodes the bank, while slower water on the inside drops its sand and gravel.",
    "Over decades the bends migrate downstream and sideways. When two loops touch, the river cuts through the narrow "
    "neck and leaves an oxbow lake behind, a curved pond that slowly fills with silt.",
    "Measuring sinuosity",
    "Geologists describe how much a river wanders with its sinuosity: the length of the channel divided by the straight "
    "distance between its ends.",
    "River\tSinuosity\nMississippi\t1.9\nRhine\t1.2",
    "The ratio is easy to compute once the channel is traced as a list of points along its centre line:",
    "def sinuosity(points):\n"
    "    channel = sum(distance(a, b) for a, b in zip(points, points[1:]))\n"
    "    return channel / distance(points[0], points[-1])",
    "Values above 1.5 are called meandering; below that the river is sinuous or straight, and engineers who straighten "
    "rivers often find that the bends slowly come back.",
]
BOILERPLATE = ["We use cookies", "Accept all", "Home", "Archive", "Subscribe", "Related stories", "How deltas are built",
               "Copyright 2024", "Privacy policy", "window.analytics", "font-family", "The Field Notes"]


@pytest.mark.parametrize("method", HTML_METHODS)
def test_every_method_keeps_the_article_as_paragraphs_with_its_table_and_code(method):
    paragraphs = extract_html(ARTICLE_PAGE, method).split("\n\n")
    for paragraph in ARTICLE_PARAGRAPHS:
        assert paragraph in paragraphs


@pytest.mark.parametrize("method", ["trafilatura", "selectolax"])
def test_main_text_methods_drop_navigation_banner_sidebar_and_footer(method):
    text = extract_html(ARTICLE_PAGE, method)
    assert [phrase for phrase in BOILERPLATE if phrase in text] == []


def test_selectolax_gives_exactly_the_article_and_builtin_everything_visible():
    byline = "By Ada Brook, 3 March 2024"
    article = "\n\n".join([ARTICLE_PARAGRAPHS[0], byline, *ARTICLE_PARAGRAPHS[1:]])
    assert extract_html(ARTICLE_PAGE, "selectolax") == article
    everything = extract_html(ARTICLE_PAGE, "builtin")
    assert everything.startswith("We use cookies to improve your experience. Accept all\n\nThe Field Notes\n\nHome\nArchive\nSubscribe\n\n")
    assert article in everything
    assert everything.endswith("Related stories\n\nHow deltas are built\nLiving with floods\n\nCopyright 2024 The Field Notes. "
                               "All rights reserved.\n\nPrivacy policy")


def test_selectolax_never_takes_the_page_itself_for_furniture():
    page = ARTICLE_PAGE.replace("<body>", '<body class="menu-open">').replace("<main>", '<main id="main-nav-target">')
    assert extract_html(page, "selectolax") == extract_html(ARTICLE_PAGE, "selectolax")


def test_trafilatura_output_is_deterministic_and_a_bare_fragment_is_read():
    assert extract_html(ARTICLE_PAGE, "trafilatura") == extract_html(ARTICLE_PAGE, "trafilatura")
    fragment = "<p>A fragment with <b>no</b> html element around it.</p>"
    assert extract_html(fragment, "trafilatura") == "A fragment with no html element around it."


MALFORMED = (
    "<html><body><div><p>Unclosed <b>bold <i>and italic paragraph text\n<p>Second &bogus; entity &#xZZ; and &#99999999; here"
    "</span></div></div><table><tr><td>cell without end<li>stray item</ul><!-- a comment never closed"
)


@pytest.mark.parametrize("method", HTML_METHODS)
def test_malformed_html_does_not_crash(method):
    text = extract_html(MALFORMED, method)
    for words in ["Unclosed bold and italic paragraph text", "Second &bogus; entity &#xZZ; and \ufffd here"]:
        assert words in text


@pytest.mark.parametrize("method", HTML_METHODS)
@pytest.mark.parametrize("page", ["", "  \n ", "<html><body></body></html>",
                                  "<html><head><title>Only a title</title></head><body><script>var x = 1;</script></body></html>"])
def test_a_page_without_text_gives_empty_text(method, page):
    assert extract_html(page, method) == ""


def test_unparsable_page_and_unknown_method():
    with pytest.raises(SkippedFile) as skipped:
        extract_html("<![unknown marked section", "builtin")  # html.parser gives up on it with an assertion
    assert skipped.value.reason == "unparsable_html"
    with pytest.raises(LmforgeError, match="unknown HTML extraction method `lxml`"):
        extract_html("<p>x</p>", "lxml")


@pytest.mark.parametrize("markdown, expected", [
    ("# Title #\n\nText", "Title\n\nText"),
    ("Setext title\n============\n\nBody\n\n---\n\nMore", "Setext title\n\nBody\n\nMore"),
    ("Some *em*, **strong**, __also strong__, _em_ and ~~gone~~ text", "Some em, strong, also strong, em and gone text"),
    ("snake_case_name and 2 * 3 * 4 and \\*literal stars\\*", "snake_case_name and 2 * 3 * 4 and *literal stars*"),
    ("Call `json.dumps(*args)` or ``a `tick` here``", "Call json.dumps(*args) or a `tick` here"),
    ("See [the docs](https://example.org \"Docs\") and [a ref][1] or <https://example.org/x>.\n\n[1]: https://example.org/ref",
     "See the docs and a ref or https://example.org/x."),
    ("[![build](https://ci.example/badge.svg)](https://ci.example) ![logo](logo.png) Intro", "Intro"),
    ("Before <!-- hidden\nover lines --> after", "Before\nafter"),
    ("> a *quoted* line", "a quoted line"),
    ("| a | b |\n|---|:-:|\n| 1 | 2 |", "| a | b |\n| 1 | 2 |"),
    ("```python\nx = *args  # `kept` **as is**\n```", "x = *args  # `kept` **as is**"),
    ("Text\n\n    indented(*code*)", "Text\n\n    indented(*code*)"),
])
def test_strip_markdown_small_inputs(markdown, expected):
    assert strip_markup(markdown, "markdown") == expected


@pytest.mark.parametrize("rst, expected", [
    ("=====\nTitle\n=====\n\nSection\n-------\nText", "Title\n\nSection\nText"),
    ("Use :func:`json.dumps` and :meth:`~json.JSONEncoder.encode`", "Use json.dumps and encode"),
    ("Read :pep:`8` and :rfc:`7159`.\n\n.. moduleauthor:: Ann <ann@example.org>", "Read PEP 8 and RFC 7159."),
    (":ref:`the guide <guide-label>` and `Python <https://python.org>`_ and Python_ [1]_ and __init__",
     "the guide and Python and Python and __init__"),
    ("``literal *x*``, *emphasis*, **strong**, \\*escaped\\*", "literal *x*, emphasis, strong, *escaped*"),
    (".. note::\n\n   Keep this *note*.\n\nAfter", "Keep this note.\n\nAfter"),
    (".. warning:: Same-line warning.", "Same-line warning."),
    (".. image:: picture.png\n   :alt: Picture\n\nAfter", "After"),
    (".. code-block:: python\n   :linenos:\n\n   def f(*args):\n       return `x`\n\nAfter", "def f(*args):\n    return `x`\n\nAfter"),
    ("Example::\n\n    >>> f(*a)\n    1\n\nAfter", "Example:\n\n>>> f(*a)\n1\n\nAfter"),
    ("Text ::\n\n    code\n\n::\n\n    more code", "Text\n\ncode\n\nmore code"),
    (":param x: the value\n:returns: nothing", ":param x: the value\n:returns: nothing"),
    (".. _guide-label:\n\n.. A comment\n   over two lines.\n\n.. |logo| image:: logo.png\n\nText", "Text"),
    (".. [1] The footnote.", "[1] The footnote."),
])
def test_strip_rst_small_inputs(rst, expected):
    assert strip_markup(rst, "rst") == expected


README = """# lmforge [![tests](https://ci.example/badge.svg)](https://ci.example)

<!-- generated; do not edit -->
A **small** library that trains *language models* on one machine. See the [guide](docs/guide.md).

## Install

```bash
pip install lmforge  # needs Python >= 3.10
```

- Train with `lmforge train`
- Serve with `lmforge serve`
"""

README_STRIPPED = """lmforge

A small library that trains language models on one machine. See the guide.

Install

pip install lmforge  # needs Python >= 3.10

- Train with lmforge train
- Serve with lmforge serve"""

RST_DOC = """:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode JSON.

**Source code:** :source:`Lib/json/__init__.py`

.. versionadded:: 3.2
   The *indent* argument.

.. function:: dumps(obj, *, indent=None)

   Serialize *obj* to a JSON formatted :class:`str`. For example::

      >>> dumps([1, 2])
      '[1, 2]'

   .. seealso::

      :rfc:`7159` and `the JSON site <https://json.org>`_.
"""

RST_DOC_STRIPPED = """json --- JSON encoder

Source code: Lib/json/__init__.py

3.2

The indent argument.

dumps(obj, *, indent=None)

Serialize obj to a JSON formatted str. For example:

>>> dumps([1, 2])
'[1, 2]'

RFC 7159 and the JSON site."""


def test_strip_a_readme_and_an_rst_document():
    assert strip_markup(README, "markdown") == README_STRIPPED
    assert strip_markup(RST_DOC, "rst") == RST_DOC_STRIPPED


def test_strip_markup_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown markup kind 'latex'"):
        strip_markup("\\section{x}", "latex")
