"""GET /: one self-contained HTML page for people (no external request: inline CSS and JS).

Everything that came from the registry (names, fingerprints, paths, messages) is escaped with
html.escape, or travels as JSON inside a non-executable script block with ``<``, ``>`` and
``&`` written as \\u escapes, and the script inserts live values with ``textContent`` only. The
Content-Security-Policy sent with the page allows its own inline code (by nonce) and
connections to this server, nothing else.
"""

from __future__ import annotations

import html
import json
import secrets
from typing import Any

from seqr.consumer.serve.live import ReloadStatus, ServedVersion
from seqr.consumer.serve.scoring import Calibration

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #dde;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f4f8}code{font-size:12px;word-break:break-all}
.ok{color:#176b2c;font-weight:600}.bad{color:#a3261b;font-weight:600}.muted{color:#667}
textarea{width:100%;height:90px;font:13px monospace}#result{background:#f6f7fb;padding:10px;
margin-top:10px;white-space:pre-wrap}button{padding:6px 16px;font-size:14px}
"""

_JS = """
const ids = JSON.parse(document.getElementById('adapter-ids').textContent);
const shown = Number(document.body.dataset.version);
function put(id, text) { document.getElementById(id).textContent = text; }
function kind(c) { return c.kind + (c.aggregation === 'soft_vote' ? ', soft votes' : ''); }
async function refresh() {
  try {
    const r = await fetch('/api/status'); const s = await r.json();
    ids.forEach((id, i) => put('count-' + i, String(s.routed[id] || 0)));
    put('pool', String(s.pool_prompts)); put('calibration', kind(s.calibration));
    put('queue', s.waiting + ' waiting, ' + s.running + ' generating');
    if (s.registry_version !== shown)
      put('stale', 'The server now serves version ' + s.registry_version + '; reload the page.');
  } catch (e) { put('stale', 'status unavailable: ' + e); }
}
document.getElementById('send').addEventListener('click', async () => {
  put('routed-adapter', '...'); put('continuation', ''); put('why', '');
  const body = {model: 'auto', prompt: document.getElementById('prompt').value, temperature: 0,
                max_tokens: Number(document.getElementById('max-tokens').value)};
  try {
    const r = await fetch('/v1/completions', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    const d = await r.json();
    if (!r.ok) { put('routed-adapter', 'error'); put('continuation', d.error.message); return; }
    put('routed-adapter', d.seqr.adapter);
    const margin = d.seqr.margin === null ? 'only choice' :
      'margin ' + d.seqr.margin.toFixed(3) + ' z over ' + d.seqr.runner_up;
    const check = d.seqr.loss_check ? ', loss check: ' + d.seqr.loss_check : '';
    put('why', margin + check + ' (calibration: ' + kind(d.seqr.calibration) + ')');
    put('continuation', d.choices[0].text);
  } catch (e) { put('routed-adapter', 'error'); put('continuation', String(e)); }
  refresh();
});
refresh(); setInterval(refresh, 2000);
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_for_script(value: Any) -> str:
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def content_security_policy(nonce: str) -> str:
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def render(
    version: ServedVersion,
    calibration: Calibration,
    routed: dict[str, int],
    pool_prompts: int,
    reload: ReloadStatus,
) -> tuple[str, str]:
    """(html, nonce) of the page for the served version."""
    nonce = secrets.token_urlsafe(16)
    r = version.report
    trust = (
        "first use (trust on first use or a pinned root)"
        if r.first_use
        else f"consistent with the trusted version {r.trusted_version_before}"
    )
    rows = []
    for i, adapter in enumerate(version.router.adapters):
        entry = adapter.entry
        rows.append(
            f"<tr><td><b>{_e(version.names[i])}</b></td><td><code>{_e(entry.client)}</code></td>"
            f"<td>{_e(entry.admitted.isoformat())}</td><td><code>{_e(entry.adapter_sha256)}"
            f"</code></td><td>{_e(entry.size_bytes)}</td>"
            f"<td id='count-{i}'>{_e(routed.get(version.names[i], 0))}</td></tr>"
        )
    keys = "<br>".join(f"<code>{_e(k)}</code>" for k in r.server_keys)
    reload_class = "bad" if reload.outcome == "failed" else "ok"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>seqr serve: registry v{_e(r.version)}</title>
<style nonce="{nonce}">{_CSS}</style></head>
<body data-version="{_e(r.version)}">
<h1>seqr serve</h1>
<div class="muted">An OpenAI-compatible server that routes each request to an adapter of an
audited registry with SEQR. Use model <code>auto</code> at <code>/v1/completions</code> or
<code>/v1/chat/completions</code>.</div>
<p id="stale" class="bad"></p>
<h2>Registry</h2>
<table>
<tr><th>location</th><td><code>{_e(r.source)}</code></td></tr>
<tr><th>version</th><td id="registry-version">{_e(r.version)} (root version {_e(r.root_version)},
signed by {_e(len(r.signed_by))} of threshold {_e(r.threshold)})</td></tr>
<tr><th>audit</th><td><span class="ok" id="audit-status">passed</span>, {_e(trust)};
expires {_e(r.expires.isoformat())}</td></tr>
<tr><th>transparency log</th><td>size <span id="log-size">{_e(r.tree_size)}</span>, root
<code id="log-root">{_e(r.tree_root)}</code></td></tr>
<tr><th>server keys</th><td>{keys}</td></tr>
<tr><th>loaded</th><td>{_e(version.loaded_at.isoformat())}
in {version.build_seconds:.2f} s</td></tr>
<tr><th>last reload</th><td><span class="{reload_class}">{_e(reload.outcome)}</span>
{_e(reload.at.isoformat())}: {_e(reload.message)}</td></tr>
<tr><th>calibration</th><td><span id="calibration">{_e(_calibration_label(calibration))}</span>;
served prompts in the query pool: <span id="pool">{_e(pool_prompts)}</span></td></tr>
<tr><th>engine</th><td id="queue"></td></tr>
</table>
<h2>Adapters</h2>
<table id="adapters"><tr><th>model id</th><th>client key fingerprint</th><th>admitted</th>
<th>adapter sha256</th><th>bytes</th><th>routed here</th></tr>
{"".join(rows)}
</table>
<h2>Try a prompt</h2>
<textarea id="prompt" placeholder="Text to route and continue"></textarea>
<div>max tokens <input id="max-tokens" type="number" value="32" min="1" max="512">
<button id="send">Route and generate</button></div>
<div id="result">adapter: <b id="routed-adapter">-</b> <span id="why" class="muted"></span>
<span class="muted">(greedy continuation)</span>
<div id="continuation"></div></div>
<script type="application/json" id="adapter-ids">{_json_for_script(list(version.names))}</script>
<script nonce="{nonce}">{_JS}</script>
</body></html>
"""
    return body, nonce


def _calibration_label(calibration: Calibration) -> str:
    """As the page's script writes it (kind())."""
    return calibration.kind + (", soft votes" if calibration.votes is not None else "")
