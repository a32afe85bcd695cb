"""report.html: the report as one self-contained page that makes no request of any kind.

Plots are embedded as ``data:`` URIs of the same PNG bytes report.md links to; the styles
are inline; there is no script. A Content-Security-Policy meta tag (``default-src 'none'``)
makes the browser refuse anything else, so even a string that slipped through unescaped
could not load or run anything. Every string comes through Jinja2 with autoescaping on
(the domain names, reasons and settings are data, some of it from other parties).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from jinja2 import Environment

from seqr.sim.report import Block

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; " \
      "form-action 'none'"  # fmt: skip

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem;
       margin: 2rem auto; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.8rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d0d0d0; padding: 0.3rem 0.6rem; text-align: left;
         vertical-align: top; }
th { background: #f3f4f6; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
</style>
</head>
<body>
{% for b in blocks %}
{% if b.kind == "h1" %}<h1>{{ b.text }}</h1>
{% elif b.kind == "h2" %}<h2>{{ b.text }}</h2>
{% elif b.kind == "h3" %}<h3>{{ b.text }}</h3>
{% elif b.kind == "p" %}<p>{{ b.text }}</p>
{% elif b.kind == "table" %}<table>
<thead><tr>{% for h in b.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in b.rows %}
<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
{% elif b.kind == "plot" and b.plot in images %}<figure>
<img src="data:image/png;base64,{{ images[b.plot] }}" alt="{{ b.text }}">
<figcaption>{{ b.text }}</figcaption></figure>
{% endif %}
{% endfor %}
</body>
</html>
"""


def render_html(blocks: list[Block], images: Mapping[str, bytes]) -> str:
    """The page: every text escaped by Jinja2, every plot a data: URI."""
    env = Environment(autoescape=True, keep_trailing_newline=True)
    title = next((b.text for b in blocks if b.kind == "h1"), "seqr report")
    encoded = {name: base64.b64encode(png).decode("ascii") for name, png in images.items()}
    return env.from_string(TEMPLATE).render(blocks=blocks, images=encoded, title=title, csp=CSP)
