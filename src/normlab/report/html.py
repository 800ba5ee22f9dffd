"""A small, self-contained HTML page builder: every user-supplied string is escaped,
plots are embedded as PNG data URIs (no external files, no scripts, no network)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1b1f24;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:right}
th{background:#f6f8fa}td.l,th.l{text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}
.holds{color:#1a7f37;font-weight:600}.fails{color:#cf222e;font-weight:600}
.inconclusive{color:#9a6700;font-weight:600}.muted{color:#57606a;font-size:.9em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto}
dt{font-weight:600}dd{margin:0 0 .5em 1.5em}
"""


_VERDICTS = ("holds", "fails", "inconclusive")


def escape(text: object) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape(str(text), quote=True)


def figure_data_uri(fig, *, dpi: int = 110) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI and close it.

    The PNG carries no metadata (no 'Software' version string), so the same figure gives
    the same bytes, and a report re-rendered from its JSON is byte-identical."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Page:
    """Accumulates escaped HTML fragments; :meth:`render` returns the whole document."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> None:
        ident = f' id="{escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h{level}{ident}>{escape(text)}</h{level}>")

    def paragraph(self, text: str, css: str | None = None) -> None:
        cls = f' class="{escape(css)}"' if css else ""
        self.parts.append(f"<p{cls}>{escape(text)}</p>")

    def verdict(self, verdict: str, text: str = "") -> None:
        v = verdict if verdict in _VERDICTS else "inconclusive"
        self.parts.append(f'<p><span class="{v}">{escape(verdict)}</span> {escape(text)}</p>')

    def table(
        self,
        header: list[str],
        rows: list[list[object]],
        first_left: bool = True,
        *,
        verdict_column: int | None = None,
    ) -> None:
        """A table; cells of ``verdict_column`` holding a verdict are coloured like one."""

        def cell(tag: str, value: object, i: int) -> str:
            classes = []
            if first_left and i == 0:
                classes.append("l")
            if tag == "td" and i == verdict_column and value in _VERDICTS:
                classes.append(str(value))
            cls = f' class="{" ".join(classes)}"' if classes else ""
            return f"<{tag}{cls}>{escape(value)}</{tag}>"

        head = "".join(cell("th", h, i) for i, h in enumerate(header))
        body = "".join(
            "<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>" for r in rows
        )
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig, alt: str) -> None:
        self.parts.append(f'<img src="{figure_data_uri(fig)}" alt="{escape(alt)}">')

    def preformatted(self, text: str) -> None:
        self.parts.append(f"<pre>{escape(text)}</pre>")

    def definitions(self, items: list[tuple[str, object]]) -> None:
        """A definition list: each term in bold, its description under it."""
        body = "".join(f"<dt>{escape(t)}</dt><dd>{escape(d)}</dd>" for t, d in items)
        self.parts.append(f"<dl>{body}</dl>")

    def details(self, summary: str, text: str) -> None:
        """Preformatted text folded under a clickable summary (no script needed)."""
        self.parts.append(
            f"<details><summary>{escape(summary)}</summary><pre>{escape(text)}</pre></details>"
        )

    def render(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>\n"
        )
