"""Small HTML builders for the report page: escaped text, tables, figures, sections. No template engine,
no script, no external resource: the page is one file that opens offline."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from pipeline.report.figures import Figure

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222; }
header { background: #1f3b57; color: #fff; padding: 14px 24px; }
header h1 { margin: 0 0 4px 0; font-size: 20px; }
header .facts span { margin-right: 18px; white-space: nowrap; }
nav { background: #eef2f6; padding: 6px 24px; position: sticky; top: 0; border-bottom: 1px solid #cdd6df; z-index: 1; }
nav a { margin-right: 14px; color: #1f3b57; text-decoration: none; font-size: 13px; }
main { padding: 8px 24px 40px 24px; max-width: 1500px; }
section { margin-top: 22px; }
h2 { font-size: 17px; border-bottom: 2px solid #1f3b57; padding-bottom: 3px; }
h3 { font-size: 15px; margin: 16px 0 6px 0; }
table { border-collapse: collapse; margin: 6px 0 10px 0; font-size: 12.5px; }
th, td { border: 1px solid #d3d9df; padding: 3px 8px; text-align: right; }
th { background: #f3f5f7; }
td.text, th.text { text-align: left; }
tr.skipped td { color: #888; }
figure { margin: 8px 0 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e6ea; }
figcaption { font-size: 12px; color: #555; }
.empty { color: #777; font-style: italic; }
.verdict { padding: 6px 10px; border-left: 4px solid #e6550d; background: #fff5eb; }
.ok { border-left-color: #31a354; background: #f0f9f0; }
details pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell's text: floats to ``digits`` decimals, NaN/None as empty, the rest as is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def table(
    frame: pd.DataFrame,
    *,
    id: str = "",
    text_columns: Sequence[str] = (),
    row_attrs: Iterable[dict[str, str]] | None = None,
    classes: Iterable[str] | None = None,
    digits: Mapping[str, int] | None = None,
) -> str:
    """A DataFrame as an HTML table (numbers right-aligned, ``text_columns`` left; floats to 4 decimals,
    or ``digits[column]``)."""
    if frame.empty:
        return empty("nothing to show")
    text = set(text_columns) | {c for c in frame.columns if frame[c].dtype == object}
    head = "".join(f'<th class="{"text" if c in text else ""}">{esc(c)}</th>' for c in frame.columns)
    places = dict(digits or {})
    attrs = list(row_attrs) if row_attrs is not None else [{}] * len(frame)
    row_classes = list(classes) if classes is not None else [""] * len(frame)
    body = []
    for (_, row), extra, cls in zip(frame.iterrows(), attrs, row_classes):
        cells = "".join(
            f'<td class="{"text" if c in text else ""}">{esc(fmt(row[c], places.get(c, 4)))}</td>'
            for c in frame.columns
        )
        more = "".join(f' {esc(k)}="{esc(v)}"' for k, v in extra.items())
        body.append(f'<tr class="{esc(cls)}"{more}>{cells}</tr>')
    ident = f' id="{esc(id)}"' if id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(fig: Figure | None, missing: str = "no figure") -> str:
    if fig is None:
        return empty(missing)
    caption = f"<figcaption>{esc(fig.caption)}</figcaption>" if fig.caption else ""
    return f'<figure><img class="fig" alt="{esc(fig.caption)}" src="{fig.uri()}">{caption}</figure>'


def empty(message: str) -> str:
    return f'<p class="empty">{esc(message)}</p>'


def paragraph(text: str, cls: str = "") -> str:
    return f'<p class="{esc(cls)}">{esc(text)}</p>'


def section(ident: str, title: str, body: Iterable[str]) -> str:
    return f'<section id="{esc(ident)}"><h2>{esc(title)}</h2>{"".join(body)}</section>'


def details(summary: str, text: str) -> str:
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"


def page(title: str, facts: list[str], sections: list[tuple[str, str, str]]) -> str:
    """The whole document: header with ``facts``, a link bar to each (id, title, html) section."""
    nav = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t, _ in sections)
    spans = "".join(f"<span>{esc(f)}</span>" for f in facts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><div class="facts">{spans}</div></header>'
        f"<nav>{nav}</nav><main>{''.join(body for _, _, body in sections)}</main></body></html>\n"
    )
