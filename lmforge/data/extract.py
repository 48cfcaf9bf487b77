"""Main text out of HTML pages, and light stripping of Markdown and reStructuredText markup.

Three HTML methods, compared on real pages by bench/bench_html_extraction.py (BENCHMARKS.md, `HTML extraction`):

- ``selectolax`` (the recipe's default: best F1 and fastest on the Python documentation): the Lexbor parser,
  minus script/style, nav/header/footer/aside/form and elements whose role, class or id names them
  navigation; everything else is kept.
- ``trafilatura``: the library's main-content detection (drops navigation, headers, footers, sidebars and
  comment sections by page structure and text density), for pages that mark nothing; about 7x slower.
- ``builtin``: the standard library's html.parser; all visible text, no boilerplate removal.

Every method returns paragraphs separated by blank lines (block elements become line breaks or blank
lines, table cells are separated by tabs) and "" for a page with no text.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from lmforge.errors import LmforgeError

HTML_METHODS = ("trafilatura", "selectolax", "builtin")


def extract_html(html: str, method: str = "selectolax") -> str:
    """Main text of a page (boilerplate removed where the method can), paragraphs separated by blank lines.

    Raises SkippedFile("unparsable_html", detail) when the page cannot be parsed; returns "" for a page
    with no text.
    """
    from lmforge.data.readers import SkippedFile  # readers imports this module

    extractor = EXTRACTORS.get(method)
    if extractor is None:
        raise LmforgeError(f"unknown HTML extraction method `{method}`; choose one of {', '.join(HTML_METHODS)}")
    if not html.strip():
        return ""
    try:
        text = extractor(html)
    except SkippedFile:
        raise
    except ImportError as exc:  # a broken installation, not a bad page: say so once instead of skipping every page
        raise LmforgeError(f"HTML extraction with {method} needs a package that cannot be imported ({exc}); "
                           f"reinstall lmforge, or set data.extraction.html to another method") from None
    except Exception as exc:  # a parser that gives up on a malformed page: the page is skipped, not the run
        raise SkippedFile("unparsable_html", f"{method}: {type(exc).__name__}: {exc}") from None
    return tidy_blank_lines(text)


TRAILING_SPACES = re.compile(r"[ \t]+\n")
MANY_NEWLINES = re.compile(r"\n{3,}")


def tidy_blank_lines(text: str) -> str:
    """No trailing spaces, at most one blank line in a row, no blank lines at either end."""
    text = TRAILING_SPACES.sub("\n", text + "\n")
    return MANY_NEWLINES.sub("\n\n", text).strip("\n")


WHITESPACE_RUN = re.compile(r"\s+")


class HtmlTextExtractor(HTMLParser):
    """Collects the visible text of an HTML page (the ``builtin`` method; ``selectolax`` drives it too).

    Tags disappear; the content of script, style, template and head (title included) is dropped;
    block elements become line breaks or blank lines; whitespace collapses as a browser would,
    except inside <pre>.
    """

    HIDDEN = frozenset({"script", "style", "template", "head", "noscript"})
    PARAGRAPH_BREAK = frozenset(
        {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre", "section", "article"}
        | {"header", "footer", "nav", "aside", "main", "figure", "form", "hr", "address", "details", "fieldset"}
    )
    LINE_BREAK = frozenset({"br", "li", "tr", "div", "dt", "dd", "figcaption", "summary", "caption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden: list[str] = []
        self.pre_depth = 0
        self.trailing_newlines = 2  # the start of the page counts as a paragraph boundary

    def text(self) -> str:
        return "".join(self.parts)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "body" and "head" in self.hidden:  # a <head> never closed ends where <body> starts
            self.hidden.clear()
        if tag in self.HIDDEN:
            self.hidden.append(tag)
        elif tag == "pre":
            self.pre_depth += 1
        self.break_for(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.hidden:
            del self.hidden[self.hidden.index(tag) :]
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in ("td", "th"):
            self.append("\t")
        elif tag != "br":
            self.break_for(tag)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        if not self.pre_depth:
            data = WHITESPACE_RUN.sub(" ", data)
            if not self.parts or self.parts[-1][-1] in " \t\n":
                data = data.lstrip(" ")
        self.append(data)

    def break_for(self, tag: str) -> None:
        wanted = 2 if tag in self.PARAGRAPH_BREAK else 1 if tag in self.LINE_BREAK else 0
        if wanted > self.trailing_newlines and not self.hidden:
            self.append("\n" * (wanted - self.trailing_newlines))

    def append(self, text: str) -> None:
        if not text:
            return
        self.parts.append(text)
        stripped = text.rstrip("\n")
        if stripped:
            self.trailing_newlines = len(text) - len(stripped)
        else:
            self.trailing_newlines += len(text)


def builtin_text(html: str) -> str:
    extractor = HtmlTextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text()


EXTRACTORS = {"builtin": builtin_text}


# Elements that are page furniture wherever they appear, and the roles and class/id words that mark
# navigation on pages that use plain divs; kept small so that ordinary content is never matched.
FURNITURE_TAGS = "script, style, noscript, template, nav, footer, aside, form, iframe, svg, button, select"
FURNITURE_ROLES = ", ".join(f"[role={role}]" for role in ("navigation", "banner", "contentinfo", "complementary", "search"))
FURNITURE_NAME = re.compile(r"(?<![a-z0-9])(nav|navbar|navigation|menu|breadcrumbs?|sidebar|footer|cookie)(?![a-z0-9])")
NEVER_FURNITURE = frozenset({"html", "body", "main", "article"})  # <body class="menu-open"> is still the page


def selectolax_text(html: str) -> str:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    return tree_text(tree.body or tree.root, skip=furniture_ids(tree))


def furniture_ids(tree) -> set[int]:
    """Node ids of the furniture to skip. Skipped while walking rather than removed: removing a node frees
    its children, and a later match inside it would then point at freed memory."""
    skip = {node.mem_id for node in tree.css(f"{FURNITURE_TAGS}, {FURNITURE_ROLES}, [hidden], [aria-hidden=true]")}
    for node in tree.css("header"):
        if not any(ancestor.tag in ("article", "main") for ancestor in ancestors(node)):  # an article's header holds its title
            skip.add(node.mem_id)
    for node in tree.css("[class], [id]"):
        names = f"{node.attributes.get('class') or ''} {node.attributes.get('id') or ''}".lower()
        if node.tag not in NEVER_FURNITURE and FURNITURE_NAME.search(names):
            skip.add(node.mem_id)
    return skip


def ancestors(node):
    node = node.parent
    while node is not None:
        yield node
        node = node.parent


def tree_text(root, skip: set[int]) -> str:
    """The text of a parsed tree without the ``skip`` subtrees, laid out by HtmlTextExtractor's rules."""
    extractor = HtmlTextExtractor()
    stack = [(root, False)]
    while stack:  # an explicit stack: deeply nested pages would overflow recursion
        node, closing = stack.pop()
        tag = node.tag
        if closing:
            extractor.handle_endtag(tag)
        elif tag == "-text":
            extractor.handle_data(node.text_content or "")
        elif tag[0] not in "-!" and node.mem_id not in skip:  # comments and doctypes have tags like "-comment", "!doctype"
            extractor.handle_starttag(tag, ())
            stack.append((node, True))
            children = []
            child = node.child
            while child is not None:
                children.append(child)
                child = child.next
            stack.extend((child, False) for child in reversed(children))
    return extractor.text()


EXTRACTORS["selectolax"] = selectolax_text


# Chosen by bench/bench_html_extraction.py on the Python documentation: `fast` skips the fallback extractors
# (readability, jusText), which on those pages picked a shorter text more often than a better one.
TRAFILATURA_OPTIONS = dict(include_comments=False, include_tables=True, favor_recall=False, favor_precision=False, fast=True)
# trafilatura's output elements, laid out as the HTML elements they stand for.
TRAFILATURA_AS_HTML = {"head": "h2", "list": "ul", "item": "li", "row": "tr", "cell": "td", "lb": "br", "quote": "blockquote"}
TRAFILATURA_RUNNING_TEXT = frozenset({"p", "head", "hi", "ref", "item", "cell", "del"})


def trafilatura_text(html: str, options: dict = TRAFILATURA_OPTIONS) -> str:
    import trafilatura
    from lxml import etree
    from trafilatura.utils import load_html

    from lmforge.data.readers import SkippedFile

    # lxml reads a bare fragment ("<p>x</p>" alone) as that element, and trafilatura finds no page in it:
    # a page body around it is what a browser assumes.
    tree = load_html(html)
    if tree is None or tree.tag != "html":
        tree = load_html(f"<html><body>{html}</body></html>")
    if tree is None:
        raise SkippedFile("unparsable_html", "trafilatura: lxml could not parse the page")
    document = trafilatura.bare_extraction(tree, with_metadata=False, deduplicate=False, **options)
    if document is None or document.body is None:
        return ""
    extractor = HtmlTextExtractor()
    for event, element in etree.iterwalk(document.body, events=("start", "end")):
        tag = TRAFILATURA_AS_HTML.get(element.tag, element.tag)
        if element.tag == "code" and ("\n" in (element.text or "") or element.getparent().tag not in TRAFILATURA_RUNNING_TEXT):
            tag = "pre"
        if event == "start":
            extractor.handle_starttag(tag, ())
            extractor.handle_data(element.text or "")
        else:
            extractor.handle_endtag(tag)
            if element is not document.body:
                extractor.handle_data(element.tail or "")
    return extractor.text()


EXTRACTORS["trafilatura"] = trafilatura_text


MARKUP_KINDS = ("markdown", "rst")


def strip_markup(text: str, kind: str) -> str:
    """Light stripping of Markdown or reStructuredText markup, keeping all the prose and code as text.

    Headings lose their markers and underlines; emphasis and inline-code backticks go, their text
    stays; links become their text; images, HTML comments, link targets and RST comments go. RST
    directives keep their argument and content (``.. note::``) unless they only place things
    (``.. image::``, ``.. toctree::``); roles keep their text (:func:`json.dumps` -> json.dumps);
    field lists stay; code blocks are kept as text, without fences or indentation of their own.
    """
    if kind not in MARKUP_KINDS:
        raise ValueError(f"unknown markup kind {kind!r}; expected one of {MARKUP_KINDS}")
    lines = text.replace("\r\n", "\n").split("\n")
    blocks, strip_inline = (markdown_blocks, markdown_inline) if kind == "markdown" else (rst_blocks, rst_inline)
    kept: list[str] = []
    prose: list[str] = []
    for line, is_code in blocks(lines):
        if not is_code:
            prose.append(line)
            continue
        if prose:  # inline markup is stripped a run of prose lines at a time: one regex pass instead of one per line
            kept.append(strip_inline("\n".join(prose)))
            prose = []
        kept.append(line)
    if prose:
        kept.append(strip_inline("\n".join(prose)))
    return tidy_blank_lines("\n".join(kept))


def protect(pattern: re.Pattern, text: str, inline):
    """Apply ``inline`` to ``text`` outside the spans ``pattern`` matches; each span becomes its group 2, untouched."""
    spans: list[str] = []

    def hide(match: re.Match) -> str:
        spans.append(match.group(2))
        return f"\ue000{len(spans) - 1}\ue001"  # private-use characters: a placeholder no markup rule touches

    def restore(match: re.Match) -> str:
        number = int(match.group(1))
        return spans[number] if number < len(spans) else match.group()  # the input's own private-use characters

    return PLACEHOLDER.sub(restore, inline(pattern.sub(hide, text)))


PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


MD_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
MD_HEADING = re.compile(r"^ {0,3}#{1,6}(?:\s+(.*?))?(?:\s+#+)?\s*$")
MD_RULE_OR_UNDERLINE = re.compile(r"^ {0,3}(?:={3,}|-{3,}|(?:\*\s*){3,}|(?:_\s*){3,})\s*$")
MD_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)+\|?\s*$")
MD_LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*\S+")
MD_BLOCKQUOTE = re.compile(r"^ {0,3}(?:>\s?)+")


def markdown_blocks(lines: list[str]):
    """(line, is_code) for the lines that stay, block markup removed."""
    fence = None
    in_comment = False
    previous_blank_or_code = True
    for line in lines:
        if fence:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            else:
                yield line, True
            continue
        if "<!--" in line or in_comment:
            line, in_comment = without_html_comments(line, in_comment)
        if match := MD_FENCE.match(line):
            fence = match.group(1)
        elif line.startswith(("    ", "\t")) and previous_blank_or_code:  # an indented code block
            yield line, True
            continue
        elif match := MD_HEADING.match(line):
            yield match.group(1) or "", False
        elif not (MD_RULE_OR_UNDERLINE.match(line) or MD_TABLE_SEPARATOR.match(line) or MD_LINK_DEFINITION.match(line)):
            yield MD_BLOCKQUOTE.sub("", line), False
        previous_blank_or_code = not line.strip()


def without_html_comments(line: str, in_comment: bool) -> tuple[str, bool]:
    """``line`` without its HTML comments, and whether a comment is still open at its end."""
    kept, position = [], 0
    if in_comment:  # the line continues a comment: what follows its end starts afresh
        end = line.find("-->")
        if end == -1:
            return "", True
        line, in_comment = line[end + 3 :].lstrip(), False
    while (start := line.find("<!--", position)) != -1:
        kept.append(line[position:start])
        end = line.find("-->", start + 4)
        if end == -1:
            return "".join(kept), True
        position = end + 3
    kept.append(line[position:])
    return "".join(kept), False


# Inline patterns never match across a line break (none lets `.` or a negated class take "\n"), and their
# spans are bounded ({1,300}), so that a pathological line of thousands of unclosed markers costs linear time.
MD_CODE_SPAN = re.compile(r"(`{1,3}) ?(.{1,300}?) ?\1")
# An image, or a link left empty by one (a badge), goes with the spaces after it.
MD_IMAGE = re.compile(r"!\[[^\]\n]{0,300}\](?:\([^)\n]{0,1000}\)|\[[^\]\n]{0,300}\])[ \t]*")
MD_EMPTY_LINK = re.compile(r"\[\](?:\([^)\n]{0,1000}\)|\[[^\]\n]{0,300}\])[ \t]*")
MD_LINK = re.compile(r"\[([^\]\n]{0,300})\](?:\([^)\n]{0,1000}\)|\[[^\]\n]{0,300}\])")
MD_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]{1,1000})>")
MD_STRONG = re.compile(r"(\*\*|__)(?=\S)(.{1,300}?)(?<=\S)\1")
# Starting with the literal * or _ (the lookbehind after it) lets the regex engine skip ahead to it.
MD_EMPHASIS_STAR = re.compile(r"\*(?<![\w*\\]\*)(?=[^\s*])(.{1,300}?)(?<=[^\s*\\])\*(?![\w*])")
MD_EMPHASIS_UNDERSCORE = re.compile(r"_(?<![\w\\]_)(?=[^\s_])(.{1,300}?)(?<=[^\s_\\])_(?!\w)")
MD_STRIKE = re.compile(r"~~(?=\S)(.{1,300}?)(?<=\S)~~")
MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")


def markdown_inline(text: str) -> str:
    return protect(MD_CODE_SPAN, text, markdown_spans)


def markdown_spans(line: str) -> str:
    line = MD_LINK.sub(r"\1", MD_EMPTY_LINK.sub("", MD_IMAGE.sub("", line)))
    line = MD_AUTOLINK.sub(r"\1", line)
    line = MD_STRIKE.sub(r"\1", MD_STRONG.sub(r"\2", line))
    line = MD_EMPHASIS_UNDERSCORE.sub(r"\1", MD_EMPHASIS_STAR.sub(r"\1", line))
    return MD_ESCAPE.sub(r"\1", line)


RST_ADORNMENT = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
RST_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
RST_DIRECTIVE = re.compile(r"^(\|[^|]+\|\s+)?([\w:.+-]+)::(?:\s+(.*))?$")
RST_OPTION = re.compile(r"^\s*:[\w -]+:(?:\s.*)?$")
RST_FOOTNOTE = re.compile(r"^\[(?:#?[\w-]*|\*)\]\s")
# Directives that only place or configure things: dropped with their content.
RST_DROPPED = frozenset({"image", "raw", "include", "literalinclude", "toctree", "contents", "sectnum", "meta", "highlight"}
                        | {"index", "module", "currentmodule", "default-role", "role", "testsetup", "testcleanup"}
                        | {"moduleauthor", "sectionauthor", "codeauthor"})
RST_CODE = frozenset({"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput"})
RST_ARGUMENT_IS_NOT_TEXT = frozenset({"figure", "only"})  # a path or a condition, not prose


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def take_indented(pending: list[str], parent_indent: int) -> list[str]:
    """Pop the next lines that are blank or indented more than ``parent_indent`` (trailing blank lines stay)."""
    block = []
    while pending and (not pending[-1].strip() or indent_of(pending[-1]) > parent_indent):
        block.append(pending.pop())
    while block and not block[-1].strip():
        pending.append(block.pop())
    return block


def dedent(lines: list[str]) -> list[str]:
    margin = min((indent_of(line) for line in lines if line.strip()), default=0)
    return [line[margin:] for line in lines]


def rst_blocks(lines: list[str]):
    """(line, is_code) for the lines that stay."""
    pending = lines[::-1]  # the next line is last: a kept directive's content is pushed back and read again
    while pending:
        line = pending.pop()
        if RST_ADORNMENT.match(line):
            continue
        if explicit := RST_EXPLICIT.match(line):
            indent, body = len(explicit.group(1)), explicit.group(2) or ""
            if RST_FOOTNOTE.match(body):
                yield " " * indent + body, False
                continue
            content = take_indented(pending, indent)
            directive = RST_DIRECTIVE.match(body)
            if not directive or directive.group(1) or directive.group(2) in RST_DROPPED:  # comments, targets, substitutions
                continue
            name, argument = directive.group(2), directive.group(3) or ""
            options = 0
            while options < len(content) and RST_OPTION.match(content[options]):
                options += 1
            content = dedent(content[options:])
            if name in RST_CODE:
                yield from ((code_line, True) for code_line in content)
                continue
            head = [] if name in RST_ARGUMENT_IS_NOT_TEXT or not argument else [argument, ""]
            pending.extend(" " * indent + kept for kept in reversed(head + content))
        elif line.rstrip().endswith("::"):  # "Example::" introduces a literal block
            prose = line.rstrip()[:-2].rstrip()
            if prose:
                yield prose + (":" if line.rstrip()[-3:-2] not in (" ", "") else ""), False
            yield from ((code_line, True) for code_line in dedent(take_indented(pending, indent_of(line))))
        else:
            yield line, False


# Each inline pattern starts with a literal character, which lets the regex engine skip ahead to it; spans are
# bounded as in Markdown.
RST_LITERAL = re.compile(r"(``)(.{1,300}?)``")
RST_NUMBERED_ROLE = re.compile(r":(pep|rfc):`(\d+)`")  # :pep:`8` reads "PEP 8"
RST_ROLE = re.compile(r":(?:[\w.+-]{1,40}:){1,3}(?=`)")
# Interpreted text may run over lines (:ref:`a long\n   title <target>`), never over a blank line.
RST_INTERPRETED = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n)){1,300})`(?::[\w:.+-]+:)?(?:__?)?(?!\w)")
RST_TITLE_AND_TARGET = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.DOTALL)
RST_STRONG = re.compile(r"\*\*(?<![\w*\\]\*\*)(?=\S)(.{1,300}?)(?<=[^\s\\])\*\*(?![\w*])")
RST_EMPHASIS = re.compile(r"\*(?<![\w*\\]\*)(?=[^\s*])(.{1,300}?)(?<=[^\s*\\])\*(?![\w*])")
RST_FOOTNOTE_REFERENCE = re.compile(r" \[(?:#?[\w-]*|\*)\]_|\[(?:#?[\w-]*|\*)\]_")
RST_REFERENCE_UNDERSCORES = re.compile(r"_(?<=[A-Za-z0-9]_)_?(?!\w)")  # Python_ and `Python`__ read "Python"
RST_ESCAPE = re.compile(r"\\([^\w\s])")


def rst_inline(text: str) -> str:
    return protect(RST_LITERAL, text, rst_spans)


def rst_spans(text: str) -> str:
    text = RST_ROLE.sub("", RST_NUMBERED_ROLE.sub(lambda match: f"{match.group(1).upper()} {match.group(2)}", text))
    text = RST_INTERPRETED.sub(lambda match: interpreted_text(match.group(1)), text)
    text = RST_EMPHASIS.sub(r"\1", RST_STRONG.sub(r"\1", text))
    text = RST_FOOTNOTE_REFERENCE.sub("", text)
    text = RST_REFERENCE_UNDERSCORES.sub(reference_underscores, text)
    return RST_ESCAPE.sub(r"\1", text)


def interpreted_text(content: str) -> str:
    """What a reader sees of `content`: the title of `title <target>`, the last part of `~a.b.c`."""
    if titled := RST_TITLE_AND_TARGET.match(content):
        content = titled.group(1) or titled.group(2)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    return content


def reference_underscores(match: re.Match) -> str:
    """"" for the underscores that end a reference name (Python_), themselves for a name like __init__."""
    text, start = match.string, match.start()
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_-"):
        start -= 1
    is_reference = text[start] != "_" and text[start - 1 : start] != "`"
    return "" if is_reference else match.group()
