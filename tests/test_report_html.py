"""report.html opened in headless Chromium: it renders every section and plot, makes no
network request of any kind, and shows data (client reasons, names) as text, never as markup."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _routed_lora import ADAPTERS, calibrate, make_peft_model, token_ids

from seqr.sim.evaluate import EvalConfig, evaluate
from seqr.sim.library import AdapterLibrary
from seqr.sim.report import write_report

HOSTILE = (
    '<img src="http://127.0.0.1:9/x.png" onerror="document.title=\'pwned\'"><script>x()</script>'
)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_peft_model(seed=0)
    library = AdapterLibrary(model, ADAPTERS, calibrate(model))
    heldout = {name: token_ids(8, 12, seed=10 + i, low=1 + 99 * i, high=100 + 99 * i).numpy()
               for i, name in enumerate(ADAPTERS)}  # fmt: skip
    evaluation = evaluate(library, heldout, EvalConfig(max_sequences_per_domain=8, batch_size=4,
                                                        peft_arrow=False),
                          reference=token_ids(6, 12, seed=99).numpy())  # fmt: skip
    clients = [
        {"client": name, "verdict": "admitted", "reason": "", "stage_seconds": {"training": 61.0},
         "losses": [[s, 3.0 - 0.2 * s + 0.1 * i] for s in range(1, 9)]}
        for i, name in enumerate(ADAPTERS)
    ] + [{"client": "broken", "verdict": "failed", "reason": HOSTILE, "losses": [],
          "stage_seconds": {}}]  # fmt: skip
    run = {"clients": 4, "base_model": "tiny-llama", "seed": 0, "quick": True,
           "training": {"steps": 8, "batch_size": 4, "sequence_tokens": 12},
           "held_out_sequences_per_domain": 8, "federation_seconds": 75.0,
           "evaluation_seconds": 20.0, "wall_seconds": 95.0, "machine": HOSTILE,
           "stages": [{"stage": "federation", "seconds": 75.0},
                      {"stage": "evaluation: route held-out text", "seconds": 12.0}]}  # fmt: skip
    timing = [{"method": m, "n": n, "us_per_token": t * n}
              for m, t in (("seqr", 0.1), ("brute_force", 0.5)) for n in (4, 16, 64)]  # fmt: skip
    # A routing mistake whose text (the domain's own) holds markup: shown as text.
    evaluation["misrouted"] = [{"domain": ADAPTERS[0], "chosen": ADAPTERS[1], "chunk": 3,
                                "text": HOSTILE}]  # fmt: skip
    evaluation["methods"]["arrow"]["mistake_losses"] = {
        "rows": 1, "chosen_lower": 0, "chosen_loss": 3.5, "labelled_loss": 3.0}  # fmt: skip
    out = tmp_path_factory.mktemp("report")
    report = {"evaluation": evaluation, "clients": clients, "run": run, "not_admitted": ["broken"]}
    write_report(report, out, timing)
    return out


class _Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action")]


def test_report_html_refers_to_nothing_outside_itself(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    parser = _Sources()
    parser.feed(page)
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "default-src 'none'" in html.unescape(page)
    assert HOSTILE not in page and "&lt;script&gt;" in page  # escaped, shown as text
    report = json.loads((report_dir / "report.json").read_text())
    assert "targets" not in report and "Targets" not in page


def test_report_renders_in_chromium_without_any_request(report_dir, browser, screenshot) -> None:
    browser.get((report_dir / "report.html").as_uri())
    assert browser.title == "seqr simulation report"  # the hostile onerror never ran
    headings = [h.text for h in browser.find_elements("css selector", "h2")]
    for wanted in ("Run", "Clients and admission", "Routing accuracy (per sequence, test split)",
                   "Held-out loss (test split)", "Routing time"):  # fmt: skip
        assert wanted in headings
    subheadings = [h.text for h in browser.find_elements("css selector", "h3")]
    for wanted in ("Wall time per stage", "Per domain", "Paired tests (McNemar)", "Exactness",
                   "Confusion matrix", "Routed vs oracle loss per domain",
                   "Routing mistakes, by the text's own loss",
                   "Where routing fails"):  # fmt: skip
        assert wanted in subheadings
    images = browser.find_elements("css selector", "img")
    assert len(images) >= 7
    widths = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
    )
    assert all(w > 100 for w in widths)  # every plot decoded from its data: URI
    requested = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(name.startswith("data:") for name in requested), requested
    assert not browser.find_elements("css selector", "script")
    body = browser.find_element("css selector", "body").text
    assert HOSTILE in body  # the client's reason is shown as text, not markup
    assert "Wilson 95% interval" in body
    screenshot()
