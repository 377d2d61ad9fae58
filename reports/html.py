"""Self-contained HTML page of the report: inline CSS, figures as base64 PNG data URIs."""

from __future__ import annotations

import base64
import dataclasses
from html import escape

import pandas as pd

from reports.cells import display_frame

# Longer tables are folded so that the figures stay in view.
FOLD_ROWS = 30
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
nav ul { columns: 2; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
.note { border-left: 3px solid #d9a400; padding-left: 0.6em; }
"""


@dataclasses.dataclass
class FigureBlock:
    """A figure: its PNG file name in the report dir, its bytes and a caption."""

    file_name: str
    png: bytes
    caption: str


@dataclasses.dataclass
class TableBlock:
    """A titled table; a folded one opens only on a click (raw facts a reader rarely wants)."""

    title: str
    table: pd.DataFrame
    folded: bool = False


@dataclasses.dataclass
class NoteBlock:
    """A remark, such as why a figure was left out."""

    text: str


@dataclasses.dataclass
class Section:
    """A titled part of the report made of blocks."""

    title: str
    anchor: str
    blocks: list = dataclasses.field(default_factory=list)


def escape_text(text: object) -> str:
    """HTML-escaped text in which no URL scheme survives as a literal '://'."""
    # Error reasons may quote URLs; the entity renders the same but is no reference.
    return escape(str(text)).replace("://", "&#58;//")


def render_table(table: pd.DataFrame) -> str:
    """An HTML table of the formatted cells."""
    shown = display_frame(table)
    header = "".join(f"<th>{escape_text(column)}</th>" for column in shown.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape_text(cell)}</td>" for cell in record) + "</tr>"
        for record in shown.itertuples(index=False)
    )
    return (f'<div class="scroll"><table><thead><tr>{header}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def render_table_block(block: TableBlock) -> str:
    """A table with its title, folded when asked to or when long."""
    count = len(block.table)
    if block.folded or count > FOLD_ROWS:
        return (f"<details><summary>{escape_text(block.title)} ({count} rows)</summary>"
                f"{render_table(block.table)}</details>")
    return f"<h3>{escape_text(block.title)}</h3>{render_table(block.table)}"


def render_figure_block(block: FigureBlock) -> str:
    """A figure inlined as a base64 PNG."""
    encoded = base64.b64encode(block.png).decode("ascii")
    caption = escape_text(block.caption)
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{caption}">'
            f"<figcaption>{caption} (also {escape_text(block.file_name)})</figcaption>"
            "</figure>")


def render_block(block: object) -> str:
    """HTML of any block."""
    if isinstance(block, FigureBlock):
        return render_figure_block(block)
    if isinstance(block, TableBlock):
        return render_table_block(block)
    if isinstance(block, NoteBlock):
        return f'<p class="note">{escape_text(block.text)}</p>'
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_section(section: Section) -> str:
    """A section heading and its blocks."""
    blocks = "\n".join(render_block(block) for block in section.blocks)
    return (f'<section id="{escape_text(section.anchor)}"><h2>{escape_text(section.title)}'
            f"</h2>\n{blocks}</section>")


def render_contents(sections: list[Section]) -> str:
    """Links to every section."""
    items = "".join(
        f'<li><a href="#{escape_text(section.anchor)}">{escape_text(section.title)}</a></li>'
        for section in sections
    )
    return f"<nav><ul>{items}</ul></nav>"


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole report page; nothing in it refers outside the file."""
    body = "\n".join(render_section(section) for section in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape_text(title)}</title><style>{STYLE}</style></head>\n<body>"
        f"<h1>{escape_text(title)}</h1><p>{escape_text(subtitle)}</p>"
        f"{render_contents(sections)}\n{body}\n</body></html>\n"
    )
