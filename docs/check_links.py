#!/usr/bin/env python3
"""Check the relative links of README.md, of the book's pages and of the built book.

Run from anywhere: python3 docs/check_links.py

Markdown (README.md and every .md under docs/src/): every relative link or
image target, `[x](path)`, `![x](path)`, `[x](path#anchor)`, `[x](#anchor)`,
a reference definition `[x]: path`, a raw `<a href>` or `<img src>`, and an
mdBook `{{#include path}}` must name an existing file or folder, resolved
relative to the .md file. An anchor into a .md file must be one of its
headings' ids, as GitHub and mdBook make them (lowercase, whitespace to
'-', punctuation other than '-' and '_' dropped, '-1', '-2' for repeats).
A book page's link must stay inside docs/src/, and a .md file it links to
must be a chapter of docs/src/SUMMARY.md: mdBook renders nothing else.
Links with a scheme (http:, https:, mailto:) and anything inside fenced
code blocks, inline code or HTML comments are skipped.

HTML (only if docs/book/ exists, mdBook's output): every relative href or
src of every .html file must resolve to a file under docs/book/. The assets
mdBook ships itself (.css, .js, fonts) and '#' anchors are not checked.

Each broken link is printed as FILE:LINE: broken link TARGET (why), then a
summary line. The exit status is 1 if any link is broken, else 0.
"""

import html.parser
import os
import re
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = DOCS / "src"
BOOK = DOCS / "book"
SUMMARY = SRC / "SUMMARY.md"

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^ *(`{3,}|~{3,})(.*)$")
# `](target)` or `](target "title")`: the link text is not needed, so nested
# brackets (an image inside a link) do not matter.
INLINE_LINK = re.compile(
    r"\]\(\s*(<[^>\n]*>|(?:[^\s()\\]|\\.|\([^\s()]*\))+)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>\n]*>|\S+)", re.M)
RAW_HTML = re.compile(r"<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*(\"[^\"]*\"|'[^']*')", re.I)
INCLUDE = re.compile(r"\{\{#(?:include|rustdoc_include|playground)\s+([^}\s]+)[^}]*\}\}")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HEADING_ID = re.compile(r"\s*\{#([^}\s]+)[^}]*\}\s*$")
ASSET_EXT = {".css", ".js", ".mjs", ".map", ".woff", ".woff2", ".ttf", ".otf", ".eot"}


def rel(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def blank(text, start, end):
    """The text with [start, end) replaced by spaces, newlines kept."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def strip_fences(text):
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in text.split("\n"):
        # Fences may sit in list items and block quotes: indentation and '>' go.
        m = FENCE.match(line.lstrip(" \t>"))
        if fence is None:
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
                fence = m.group(1)
                out.append(" " * len(line))
                continue
            out.append(line)
        else:
            stripped = line.strip(" \t>")
            if (
                stripped
                and set(stripped) == {fence[0]}
                and len(stripped) >= len(fence)
            ):
                fence = None
            out.append(" " * len(line))
    return "\n".join(out)


def strip_comments_and_code(text):
    """Fences, HTML comments and inline code spans blanked."""
    text = strip_fences(text)
    for m in reversed(list(re.finditer(r"<!--.*?-->", text, re.S))):
        text = blank(text, m.start(), m.end())
    # A code span: a run of backticks, then anything not crossing a blank
    # line, then the same run.
    span = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
    for m in reversed(list(span.finditer(text))):
        text = blank(text, m.start(), m.end())
    return text


def slugify(heading):
    """(GitHub's id, mdBook's id) for a heading's Markdown text."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    # Emphasis markers go; underscores inside words stay.
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<![\w])_+|_+(?![\w])", "", text)
    text = text.strip()

    def keep(lower):
        out = []
        for ch in lower:
            if ch.isalnum() or ch in "-_":
                out.append(ch)
            elif ch.isspace():
                out.append("-")
        return "".join(out)

    github = keep(text.lower())
    mdbook = keep("".join(c.lower() if c.isascii() else c for c in text))
    return github, mdbook


_heading_cache = {}


def heading_ids(path, seen=None):
    """Every id the headings of a Markdown file get (includes expanded)."""
    path = Path(path).resolve()
    if path in _heading_cache:
        return _heading_cache[path]
    seen = set() if seen is None else seen
    if path in seen:
        return set()
    seen.add(path)
    texts = []
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return set()
    lines = strip_fences(raw).split("\n")
    for i, line in enumerate(lines):
        inc = INCLUDE.search(line)
        if inc:
            target = path.parent / urllib.parse.unquote(inc.group(1).split(":")[0])
            texts.append(("include", target))
            continue
        m = ATX.match(line)
        if m:
            texts.append(m.group(2) or "")
            continue
        if (
            SETEXT.match(line)
            and i > 0
            and lines[i - 1].strip()
            and not ATX.match(lines[i - 1])
            and not lines[i - 1].lstrip().startswith(("-", "*", "+", ">", "|"))
        ):
            texts.append(lines[i - 1].strip())
    ids, counts = set(), {}
    for text in texts:
        if isinstance(text, tuple):
            ids |= heading_ids(text[1], seen)
            continue
        explicit = HEADING_ID.search(text)
        if explicit:
            ids.add(explicit.group(1))
            text = text[: explicit.start()]
        for slug in set(slugify(text)):
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            ids.add(slug if n == 0 else f"{slug}-{n}")
    _heading_cache[path] = ids
    return ids


def summary_chapters():
    """The .md files SUMMARY.md makes chapters of (resolved paths)."""
    chapters = set()
    if not SUMMARY.is_file():
        return chapters
    text = strip_comments_and_code(SUMMARY.read_text(encoding="utf-8"))
    for m in INLINE_LINK.finditer(text):
        target = m.group(1).strip("<>").split("#")[0]
        if target and not SCHEME.match(target):
            chapters.add((SRC / urllib.parse.unquote(target)).resolve())
    return chapters


def inside(path, folder):
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def check_target(md, target, chapters):
    """None if the link is fine, else why it is broken."""
    target = target.strip()
    if target.startswith("<") and target.endswith(">"):
        target = target[1:-1]
    if not target or SCHEME.match(target) or target.startswith("//"):
        return None
    path_part, _, anchor = target.partition("#")
    path_part = urllib.parse.unquote(path_part.split("?")[0])
    anchor = urllib.parse.unquote(anchor)
    if path_part.startswith("/"):
        return "an absolute path; links must be relative"
    dest = (md.parent / path_part).resolve() if path_part else md.resolve()
    if not dest.exists():
        return "no such file or folder"
    in_book = inside(md, SRC)
    if in_book and path_part:
        if not inside(dest, SRC):
            return "outside docs/src/: not part of the book"
        if dest.suffix == ".md" and dest.is_file() and dest not in chapters:
            return "not a chapter of docs/src/SUMMARY.md: mdBook does not render it"
    if anchor and dest.is_file() and dest.suffix == ".md":
        if anchor not in heading_ids(dest):
            return f"no heading with the id '{anchor}' in {rel(dest)}"
    return None


def check_markdown(md, chapters, broken):
    raw = md.read_text(encoding="utf-8")
    fenced = strip_fences(raw)
    text = strip_comments_and_code(raw)
    found = []
    # Includes are directives, not links: look for them outside code blocks only.
    for m in INCLUDE.finditer(fenced):
        found.append((m.start(), m.group(1).split(":")[0], "include"))
    for m in INLINE_LINK.finditer(text):
        found.append((m.start(1), m.group(1), "link"))
    for m in REF_DEF.finditer(text):
        found.append((m.start(1), m.group(1), "link"))
    for m in RAW_HTML.finditer(text):
        found.append((m.start(1), m.group(1)[1:-1], "link"))
    count = 0
    for offset, target, kind in sorted(found):
        count += 1
        line = raw.count("\n", 0, offset) + 1
        if kind == "include":
            dest = (md.parent / urllib.parse.unquote(target)).resolve()
            why = None if dest.is_file() else "included file does not exist"
        else:
            why = check_target(md, target, chapters)
        if why:
            broken.append(f"{rel(md)}:{line}: broken link {target} ({why})")
    return count


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs, self.base = [], None

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if tag == "base" and name == "href" and value:
                self.base = value
            elif name in ("href", "src") and value is not None:
                self.refs.append((self.getpos()[0], value))

    handle_startendtag = handle_starttag


def check_html(page, broken):
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    base = page.parent
    if parser.base and not SCHEME.match(parser.base) and not parser.base.startswith("/"):
        base = (page.parent / parser.base).resolve()
    count = 0
    for line, value in parser.refs:
        value = value.strip()
        if not value or value.startswith("#") or SCHEME.match(value) or value.startswith("//"):
            continue
        path_part = urllib.parse.unquote(value.split("#")[0].split("?")[0])
        if not path_part or Path(path_part).suffix.lower() in ASSET_EXT:
            continue
        count += 1
        if path_part.startswith("/"):
            why = "an absolute path; links must be relative"
        else:
            dest = (base / path_part).resolve()
            if not inside(dest, BOOK):
                why = "outside docs/book/"
            elif dest.is_dir():
                why = None if (dest / "index.html").is_file() else "a folder without index.html"
            else:
                why = None if dest.is_file() else "no such file under docs/book/"
        if why:
            broken.append(f"{rel(page)}:{line}: broken link {value} ({why})")
    return count


def main():
    broken = []
    chapters = summary_chapters()
    pages = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    pages += sorted(SRC.rglob("*.md")) if SRC.is_dir() else []
    md_links = sum(check_markdown(p, chapters, broken) for p in pages)
    html_files, html_links = [], 0
    if BOOK.is_dir():
        html_files = sorted(BOOK.rglob("*.html"))
        html_links = sum(check_html(p, broken) for p in html_files)
    for line in broken:
        print(line)
    book = (
        f"{html_links} links in {len(html_files)} HTML files of docs/book/"
        if BOOK.is_dir()
        else "docs/book/ not built, HTML not checked"
    )
    print(
        f"{len(broken)} broken link(s): checked {md_links} links in "
        f"{len(pages)} Markdown files, {book}"
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
