"""``report.html``: one self-contained page (no scripts, no external resources, figures as data URIs).

The page shows the summary (claims passed, time, size), the claims table (a failed claim in red with its
explanation), one section per experiment (the paper's setting beside our settings and figures), and the
versions. It is built from ``report.json``'s content only, plus the PNG files the experiments wrote.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

__all__ = ["render_html"]

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
tr.pass td.status { background: #d9f2d9; } tr.fail td.status { background: #f8d0d0; font-weight: bold; }
tr.fail { background: #fff3f3; }
.exp { border-top: 2px solid #888; margin-top: 2em; padding-top: 0.5em; }
.row { display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }
.setting { flex: 1 1 300px; } .figs { flex: 2 1 500px; }
.figs img { max-width: 100%; display: block; margin-bottom: 0.5em; border: 1px solid #ddd; }
.standin { background: #fff6d5; padding: 0.2em 0.4em; } .skipped { color: #a60; }
code { font-size: 0.9em; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _img(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        return f'<p class="skipped">figure {_e(rel)} is missing</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(rel)}" src="data:image/png;base64,{data}">'


_REL = {"close": "|m − e| ≤ tol", "at_most": "m ≤ e + tol", "at_least": "m ≥ e − tol"}


def _claims_table(claims: list[dict[str, Any]]) -> str:
    head = "<tr><th>status</th><th>id</th><th>statement</th><th>expected</th><th>measured</th><th>tolerance</th>"
    head += "<th>check</th><th>source</th><th>run</th></tr>"
    rows = []
    for c in claims:
        why = f"<br><em>why it failed:</em> {_e(c['explanation'])}" if c["status"] == "fail" else ""
        rows.append(
            f'<tr class="{c["status"]}" id="claim-{_e(c["id"])}"><td class="status">{_e(c["status"])}</td>'
            f"<td><code>{_e(c['id'])}</code></td><td>{_e(c['statement'])}{why}</td><td>{_num(c['expected'])}</td>"
            f"<td>{_num(c['measured'])}</td><td>{_num(c['tolerance'])}</td><td>{_e(_REL.get(c['relation'], ''))}</td>"
            f"<td>{_e(c['source'])}</td><td><code>{_e(c['run'])}</code></td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _experiment(root: Path, r: dict[str, Any]) -> str:
    parts = [f'<div class="exp" id="exp-{_e(r["id"])}"><h3>{_e(r["title"])} <small>(<code>{_e(r["id"])}</code>, '
             f"paper {_e(r['paper'])})</small></h3>"]  # fmt: skip
    if r.get("skipped"):
        parts.append(f'<p class="skipped">{_e(r["skipped"])}</p>')
    if r.get("stand_in"):
        parts.append(f'<p class="standin">Stand-in at this size: {_e(r["stand_in"])}</p>')
    settings = json.dumps(r.get("settings", {}), indent=1, default=str)
    figs = "".join(_img(root, f) for f in r.get("figures", [])) or "<p>(no figure: a table of numbers)</p>"
    seconds = f"{r['seconds']:.1f} s" if "seconds" in r else "—"
    parts.append(
        f'<div class="row"><div class="setting"><h4>The paper\'s setting</h4><p>{_e(r["setting"])}</p>'
        f"<h4>This run</h4><pre>{_e(settings)}</pre><p>time: {seconds}</p></div>"
        f'<div class="figs">{figs}</div></div>'
    )
    for note in r.get("notes", []):
        parts.append(f'<p class="note">Note: {_e(note)}</p>')
    if r.get("claims"):
        parts.append(_claims_table(r["claims"]))
    parts.append("</div>")
    return "".join(parts)


def render_html(report: dict[str, Any], root: str | Path) -> str:
    """The report page for ``report`` (the content of ``report.json``); figures are read from ``root``."""
    root = Path(root)
    s = report["summary"]
    failed = [c for c in report["claims"] if c["status"] == "fail"]
    fail_list = "".join(
        f'<li><a href="#claim-{_e(c["id"])}"><code>{_e(c["id"])}</code></a>: {_e(c["statement"])} — measured '
        f"{_num(c['measured'])}, expected {_num(c['expected'])} ± {_num(c['tolerance'])}. {_e(c['explanation'])}</li>"
        for c in failed
    )
    failures = f"<h2>Failed claims</h2><ul>{fail_list}</ul>" if failed else "<p>Every claim passed.</p>"
    versions = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in report["versions"].items())
    settings = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in report["settings"].items())
    body = (
        f"<h1>deepcollapse reproduce: {s['passed']} of {s['claims']} claims pass</h1>"
        f"<p>Size <b>{_e(report['settings'].get('size'))}</b>; experiments took {report['seconds']:.0f} s in all. "
        "Paper 2023: <i>Deep Neural Collapse Is Provably Optimal for the Deep Unconstrained Features Model</i>; "
        "paper 2024: <i>Neural Collapse versus Low-rank Bias: Is Deep Neural Collapse Really Optimal?</i></p>"
        f"{failures}<h2>Claims</h2>{_claims_table(report['claims'])}<h2>Experiments</h2>"
        + "".join(_experiment(root, r) for r in report["experiments"])
        + f"<h2>Settings</h2><table>{settings}</table><h2>Versions</h2><table>{versions}</table>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>deepcollapse reproduce report</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )
