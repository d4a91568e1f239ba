"""``streamtrain report``: a run directory's history as one self-contained HTML page.

``<out>/index.html`` holds everything (each PNG embedded as a data URI, so the one file can
be mailed or attached to a ticket); the PNGs are also written beside it, linked from the
page, for slides and diffs.

Does not: touch a running daemon or the checkpoints; it reads ``timeseries/`` and the
reference curves only.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamtrain.report.curves import read_curves
from streamtrain.report.history import TIMESERIES_DIR, History, Row, load_history
from streamtrain.report.plots import RenderedPlot, render_plots

PAGE = "index.html"


class NoHistoryError(ValueError):
    """The run directory has no history to draw."""


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Draw ``run_dir``'s history into ``out_dir`` (default ``<run_dir>/report``); returns the page."""
    history = load_history(run_dir)
    if not history:
        raise NoHistoryError(f"{run_dir / TIMESERIES_DIR} holds no run history: point at the run_dir of a daemon "
                             "(streamtrain run / demo) that has run for a few seconds")
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = read_curves(run_dir)
    plots = render_plots(history, curves, out_dir)
    page = out_dir / PAGE
    tmp = page.with_name(PAGE + ".tmp")
    tmp.write_text(render_page(run_dir, history, curves, plots), encoding="utf-8")
    tmp.replace(page)
    return page


def render_page(run_dir: Path, history: History, curves: dict[str, list[Row]], plots: Sequence[RenderedPlot]) -> str:
    figures = "\n".join(  # each PNG carries its title: no heading above it
        f'<figure id="{p.plot.name}">'
        f'<img alt="{_e(p.plot.title)}" src="data:image/png;base64,{base64.b64encode(p.path.read_bytes()).decode()}">'
        f'<figcaption>{_e(p.plot.caption)} <a href="{_e(p.path.name)}">{_e(p.path.name)}</a></figcaption></figure>'
        for p in plots)
    contents = " &middot; ".join(f'<a href="#{p.plot.name}">{_e(p.plot.title)}</a>' for p in plots)
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>streamtrain report: {_e(str(run_dir))}</title>
<style>{_CSS}</style></head>
<body>
<h1>streamtrain run report</h1>
<p class="sub">{_e(str(run_dir))} &middot; generated {generated}</p>
<table class="facts">{_rows(_facts(history, curves))}</table>
<p class="toc">{contents}</p>
{_transitions(history.events)}
<h2>Over samples trained (bottom axis) and event time (top axis); FROZEN spans shaded red</h2>
{figures}
<footer>Drawn from <code>{TIMESERIES_DIR}/</code> (written by the daemon; bounded: older rows are thinned) and,
when present, <code>oracle.jsonl</code> / <code>baselines.jsonl</code> (reference curves; the file contract is in
<code>streamtrain/report/curves.py</code>).</footer>
</body></html>
"""


def _facts(history: History, curves: dict[str, list[Row]]) -> list[tuple[str, str]]:
    status, events = history.status, history.events
    facts: list[tuple[str, str]] = []
    if status:
        first, last = status[0], status[-1]
        seconds = float(last["t"]) - float(first["t"])
        trained = int(last["samples"]) - int(first["samples"])
        facts.append(("wall time", f"{_clock(first['t'])} → {_clock(last['t'])} ({_duration(seconds)})"))
        timed = [r["ts_ms"] for r in status if r.get("ts_ms") is not None]
        if timed:
            facts.append(("event time", f"{_clock(_ms(timed[0]))} → {_clock(_ms(timed[-1]))} (the joiner's watermark)"))
        rate = f" · {trained / seconds:,.0f} samples/s" if seconds > 0 else ""
        facts.append(("samples trained", f"{int(last['samples']):,} in {int(last.get('steps', 0)):,} steps{rate}"))
        events_consumed, dlq = int(last.get("events", 0)), int(last.get("dlq", 0))
        share = f" ({dlq / events_consumed:.2%})" if events_consumed else ""
        facts.append(("events consumed", f"{events_consumed:,} · dead-lettered {dlq:,}{share}"))
        facts.append(("gate now", str(last.get("gate") or "?").upper()))
    facts += _auc_facts(history.windows.get("auc", []), curves)
    freezes = sum(1 for e in events if e.get("kind") == "gate" and e.get("to") == "frozen")
    facts.append(("freezes", str(freezes)))
    checkpoints = [e for e in events if e.get("kind") == "checkpoint"]
    failures = sum(int(e.get("count", 1)) for e in events if e.get("kind") == "checkpoint_failed")
    facts.append(("checkpoints", f"{sum(int(e.get('count', 1)) for e in checkpoints)} written"
                  + (f", last {checkpoints[-1].get('name')}" if checkpoints else "")
                  + (f" · {failures} failed" if failures else "")))
    versions = [e for e in events if e.get("kind") == "version"]
    facts.append(("CURRENT version", f"{versions[-1].get('name')} ({len(versions)} changes)" if versions else "none"))
    return facts


def _auc_facts(windows: list[Row], curves: dict[str, list[Row]]) -> list[tuple[str, str]]:
    """The model's window AUC over the second half of its windows, and each reference curve's
    over the same windows (matched by ``rows``)."""
    judged = [w for w in windows if (w.get("metrics") or {}).get("auc/ctr") is not None]
    if not judged:
        return [("window AUC (CTR)", "no window closed")]
    late = judged[len(judged) // 2:]
    rows = {int(w["rows"]) for w in late}
    out = [("window AUC (CTR)", f"{np.mean([w['metrics']['auc/ctr'] for w in late]):.3f} mean of the last "
                                f"{len(late)} windows · last {judged[-1]['metrics']['auc/ctr']:.3f}")]
    for name, points in curves.items():
        same = [p["auc_ctr"] for p in points if p.get("rows") in rows and p.get("auc_ctr") is not None]
        if same:
            out.append((f"{name} AUC (CTR)", f"{np.mean(same):.3f} on {len(same)} of the same windows"))
    return out


def _transitions(events: list[Row]) -> str:
    gate = [e for e in events if e.get("kind") == "gate"]
    if not gate:
        return "<h2>Gate transitions</h2><p>None: the gate stayed OPEN.</p>"
    body = "".join(
        f"<tr class=\"{_e(str(e.get('to')))}\"><td>{_e(str(e.get('seq')))}</td><td>{int(e['samples']):,}</td>"
        f"<td>{_clock(_ms(e.get('ts_ms')))}</td><td>{_e(str(e.get('from')).upper())} → {_e(str(e.get('to')).upper())}"
        f"{' (operator)' if e.get('manual') else ''}</td><td>{_e(str(e.get('reason', '')))}</td></tr>"
        for e in gate)
    return ("<h2>Gate transitions</h2><table class=\"gate\"><tr><th>#</th><th>samples</th><th>event time</th>"
            f"<th>change</th><th>reason</th></tr>{body}</table>")


def _rows(facts: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _ms(ts_ms: object) -> float | None:
    return float(ts_ms) / 1000.0 if isinstance(ts_ms, (int, float)) else None


def _clock(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(seconds)))


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else f"{m}m {s:02d}s"


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1140px;
       color: #1f2328; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 16px; margin: 26px 0 6px; }
.sub { color: #57606a; margin: 0 0 16px; }
table { border-collapse: collapse; }
table.facts th { text-align: left; font-weight: 600; padding: 2px 18px 2px 0; color: #57606a; white-space: nowrap; }
table.facts td { padding: 2px 0; }
table.gate { width: 100%; font-size: 13px; }
table.gate th, table.gate td { border-bottom: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
table.gate tr.frozen td { background: #fff1f0; }
figure { margin: 0 0 18px; }
.toc { font-size: 13px; }
figure img { width: 100%; border: 1px solid #d0d7de; border-radius: 4px; }
figcaption { color: #57606a; font-size: 13px; }
footer { color: #57606a; font-size: 12px; margin-top: 28px; border-top: 1px solid #d0d7de; padding-top: 8px; }
"""
