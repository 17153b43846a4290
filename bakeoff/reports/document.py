"""A report as a list of blocks, rendered to Markdown and to one self-contained HTML page (figures inlined).

Inline markup is one thing only: ``**bold**``. A table cell is a string or a list of lines; in HTML, lines up
to :data:`NOWRAP` characters do not wrap.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

Cell = str | list[str]
NOWRAP = 32


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)  # footnotes, printed under the table


@dataclass(frozen=True)
class Figure:
    path: Path  # the PNG on disk
    rel: str  # its path relative to the report directory
    caption: str


Block = Heading | Para | Bullets | Code | Table | Figure


def _lines(cell: Cell) -> list[str]:
    return [cell] if isinstance(cell, str) else list(cell)


def _md_cell(cell: Cell) -> str:
    return "<br>".join(line.replace("|", "\\|") for line in _lines(cell)) or " "


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Code):
            out.append(f"```\n{b.text}\n```")
        elif isinstance(b, Table):
            rows = [b.header, ["---"] * len(b.header), *b.rows]
            out.append("\n".join("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows))
            out += b.notes  # each its own paragraph (lines joined by one newline would run together)
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({b.rel})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


def inline_html(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text, quote=False))


def _html_cell(cell: Cell, tag: str) -> str:
    """Short lines never wrap (a number and its unit stay together); long ones may."""
    return f"<{tag}>" + "<br>".join(f"<span>{inline_html(line)}</span>" if len(line) <= NOWRAP else inline_html(line)
                                    for line in _lines(cell)) + f"</{tag}>"


STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a;
       max-width: 1400px; margin: 2em auto; padding: 0 1.5em; }
.wide { overflow-x: auto; } td span { white-space: nowrap; }
h1 { font-size: 1.8em; margin-bottom: .2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 5px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
.notes { font-size: 12.5px; color: #444; margin-top: -.5em; }
pre { background: #f6f6f6; border-left: 4px solid #0072B2; padding: .8em 1em; white-space: pre-wrap; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13.5px; color: #333; margin-top: .3em; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    """One HTML page with every figure embedded as a base64 PNG (no external file is referenced)."""
    out = [(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>")]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Code):
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif isinstance(b, Table):
            head = "<tr>" + "".join(_html_cell(h, "th") for h in b.header) + "</tr>"
            body = "".join("<tr>" + "".join(_html_cell(c, "td") for c in r) + "</tr>" for r in b.rows)
            out.append(f"<div class=\"wide\"><table><thead>{head}</thead><tbody>{body}</tbody></table></div>")
            if b.notes:
                out.append("<div class=\"notes\">" + "<br>".join(inline_html(n) for n in b.notes) + "</div>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(b.caption)}\">"
                       f"<figcaption>{inline_html(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
