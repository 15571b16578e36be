"""A self-contained HTML report: sections of text, plotly figures and tables, one file.

plotly.js is inlined once (``plotly.offline.get_plotlyjs()``), so the file opens offline with no
CDN. Other analyses append their own sections::

    report = Report("speech_lens: SpiritLM on LibriSpeech dev")
    report.add_section("Implicit transcription", text="...", figures=[fig], tables=[rows])
    report.write("out/report.html")
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from speech_lens.files import atomic_write_text

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Table:
    """Rows of a table (dicts sharing keys); at most ``max_rows`` are shown."""

    rows: Sequence[Row]
    caption: str = ""
    columns: Sequence[str] | None = None
    max_rows: int = 200


@dataclass(frozen=True)
class Section:
    title: str
    text: str = ""
    figures: Sequence[go.Figure] = ()
    tables: Sequence[Table] = ()
    html: str = ""  # raw HTML appended after the text (trusted, from the caller)


@dataclass
class Report:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def add_section(
        self,
        title: str,
        text: str = "",
        figures: Sequence[go.Figure] = (),
        tables: Sequence[Table | Sequence[Row]] = (),
        html: str = "",
    ) -> Report:
        """Append a section; ``text`` is plain text (blank lines separate paragraphs)."""
        for f in figures:
            if not isinstance(f, go.Figure):
                raise TypeError(f"section {title!r}: figures must be plotly Figures, got {type(f)}")
        tabs = [t if isinstance(t, Table) else Table(rows=list(t)) for t in tables]
        self.sections.append(Section(title, text, list(figures), tabs, html))
        return self

    def to_html(self) -> str:

        body = []
        for i, s in enumerate(self.sections):
            parts = [f'<section id="s{i}"><h2>{html.escape(s.title)}</h2>']
            for para in (p.strip() for p in s.text.split("\n\n")):
                if para:
                    parts.append(f"<p>{html.escape(para)}</p>")
            if s.html:
                parts.append(s.html)
            for j, fig in enumerate(s.figures):
                parts.append(
                    '<div class="fig">'
                    + fig.to_html(
                        full_html=False,
                        include_plotlyjs=False,
                        include_mathjax=False,
                        div_id=f"fig-{i}-{j}",
                        # figures with a set width (wide heatmaps) keep it and scroll
                        config={"displaylogo": False, "responsive": fig.layout.width is None},
                    )
                    + "</div>"
                )
            for t in s.tables:
                parts.append(_table_html(t))
            parts.append("</section>")
            body.append("\n".join(parts))
        toc = "".join(
            f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
            for i, s in enumerate(self.sections)
        )
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(self.title)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(self.title)}</h1>
<p class="sub">{html.escape(self.subtitle)} &middot; generated {stamp} by speech_lens</p>
<nav><ol>{toc}</ol></nav>
{"".join(body)}
</body></html>
"""

    def write(self, path: str | Path) -> Path:
        """Write the report atomically (temp file in the same directory, then ``os.replace``)."""
        return atomic_write_text(path, self.to_html())


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table_html(t: Table) -> str:
    rows = list(t.rows)
    cols = list(t.columns) if t.columns is not None else (list(rows[0]) if rows else [])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in cols) + "</tr>"
        for r in rows[: t.max_rows]
    )
    more = (
        f'<p class="note">{len(rows) - t.max_rows} more rows not shown</p>'
        if len(rows) > t.max_rows
        else ""
    )
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f'<div class="tbl"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}</div>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;
margin:24px auto;padding:0 16px;color:#222}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-top:0}nav ol{columns:2;font-size:.95em}
.fig{margin:12px 0;overflow-x:auto}.tbl{overflow-x:auto;max-height:480px;overflow-y:auto;margin:12px 0}
table{border-collapse:collapse;font-size:.82em}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4;position:sticky;top:0}caption{text-align:left;font-weight:600;padding:4px 0}
.note{color:#666;font-size:.85em}
"""
