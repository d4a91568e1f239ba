"""The report's figures: one PNG per view, over samples trained (bottom axis) and event
time (top axis), with the spans of a FROZEN gate shaded on every view.

Every view is always drawn, with a note in place of the lines when the run has nothing
for it (no drift monitor, no oracle), so a report always has the same files. The only
module of the project that imports matplotlib (Agg: no display needed).

Does not: read files (it takes a :class:`~streamtrain.report.history.History` and the
curves) or write HTML.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from streamtrain.report.history import History, Row  # noqa: E402

MS_PER_DAY = 86_400_000  # matplotlib dates are days since 1970-01-01
# One fixed frame for every view (figure fractions), so the plots' x axes line up when the
# page stacks them: room for the title and the event-time axis above, legends on the right.
FRAME = dict(left=0.095, right=0.79, bottom=0.15, top=0.78)
LEGEND_AT = (0.855, 0.78)  # beside a right-hand y axis's label too
FROZEN_COLOR = "#d62728"
MAX_FEATURES = 12  # PSI lines beyond this are the least drifted; the legend says how many are left out


@dataclass(frozen=True)
class Plot:
    name: str  # file stem: <name>.png
    title: str
    caption: str  # what it shows and how to read it (the page prints it under the image)


@dataclass(frozen=True)
class RenderedPlot:
    plot: Plot
    path: Path


Curves = dict[str, list[Row]]


class _Frame:
    """What every view shares: x = samples trained, the event-time mapping, frozen spans."""

    def __init__(self, history: History) -> None:
        status = history.status
        self.samples = _column(status, "samples")
        timed = [(r["samples"], r["ts_ms"]) for r in status if r.get("ts_ms") is not None]
        self.event_time: tuple[np.ndarray, np.ndarray] | None = None
        if timed:
            x, ts = (np.asarray(c, dtype=np.float64) for c in zip(*timed))
            x, first = np.unique(x, return_index=True)  # status rows are in samples order (history.py)
            days = np.maximum.accumulate(ts[first]) / MS_PER_DAY
            if len(x) >= 2 and days[-1] > days[0]:
                self.event_time = (x, days)
        self.frozen = [(a, b) for a, b, state in _gate_spans(status) if state == "frozen"]
        finite = self.samples[np.isfinite(self.samples)]
        self.xlim: tuple[float, float] | None = None
        if len(finite) and finite.max() > finite.min():
            pad = 0.015 * (finite.max() - finite.min())  # markers at either end stay whole
            self.xlim = (float(finite.min() - pad), float(finite.max() + pad))

    def axes(self, fig: Figure, ylabel: str) -> Axes:
        ax = fig.add_subplot()
        ax.set_xlabel("samples trained")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if self.xlim is not None:  # every view spans the whole run, whatever its own data covers
            ax.set_xlim(*self.xlim)
        for start, end in self.frozen:
            ax.axvspan(start, end, color=FROZEN_COLOR, alpha=0.12, lw=0)
        if self.event_time is not None:
            x, days = self.event_time
            top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, x, days),
                                                       lambda d: np.interp(d, days, x)))
            locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
            top.xaxis.set_major_locator(locator)
            top.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            top.set_xlabel("event time (UTC)", fontsize=8)
            top.tick_params(labelsize=8)
        return ax


def render_plots(history: History, curves: Curves, out_dir: Path) -> list[RenderedPlot]:
    """Draw every view into ``out_dir/<name>.png``; returns them in page order."""
    frame = _Frame(history)
    rendered = []
    for plot, draw in _VIEWS:
        fig = plt.figure(figsize=(11, 3.6), dpi=100)
        fig.subplots_adjust(**FRAME)
        try:
            fig.suptitle(plot.title, fontsize=11, x=0.01, ha="left")
            draw(fig, frame, history, curves)
            path = out_dir / f"{plot.name}.png"
            fig.savefig(path)
        finally:
            plt.close(fig)
        rendered.append(RenderedPlot(plot, path))
    return rendered


# ---------------------------------------------------------------------------- views
def _auc(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "window AUC")
    windows = history.windows.get("auc", [])
    x = _column(windows, "samples")
    rows = _column(windows, "rows")
    for head, color in (("ctr", "C0"), ("ctcvr", "C1")):
        ax.plot(x, _metric(windows, f"auc/{head}"), color=color, marker="o", ms=3, lw=1.6, label=f"model {head.upper()}")
    for i, (name, points) in enumerate(curves.items()):
        at = _column(points, "rows")
        cx = np.interp(at, rows, x) if len(rows) >= 2 else at  # placed at the model's window with those rows
        oracle = name == "oracle"
        for head, color in (("ctr", "C0" if oracle else f"C{i + 2}"), ("ctcvr", "C1" if oracle else f"C{i + 2}")):
            values = _column(points, f"auc_{head}")
            if np.isfinite(values).any():
                ax.plot(cx, values, color=color, ls="--" if oracle else (":" if head == "ctcvr" else "-."), lw=1.3,
                        label=f"{name} {head.upper()}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    _legend_or_note(ax, "no AUC window closed yet (monitors.auc.window samples each)")


def _labels(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "CTR (clicks / exposures)")
    windows = history.windows.get("label_ratio", [])
    x = _column(windows, "samples")
    ax.plot(x, _metric(windows, "rate/ctr"), color="C0", marker="o", ms=3, label="CTR")
    ax.plot(x, _metric(windows, "baseline/ctr"), color="C0", ls=":", label="CTR baseline")
    right = ax.twinx()
    right.set_ylabel("CVR (conversions / clicks)")
    right.plot(x, _metric(windows, "rate/cvr"), color="C1", marker="s", ms=3, label="CVR")
    right.plot(x, _metric(windows, "baseline/cvr"), color="C1", ls=":", label="CVR baseline")
    _legend_or_note(ax, "no label-ratio window closed yet", extra=right)


def _psi(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "PSI vs reference")
    windows = history.windows.get("feature_drift", [])
    x = _column(windows, "samples")
    features = sorted({k.partition("/")[2] for w in windows for k in w.get("metrics", {}) if k.startswith("psi/")})
    peaks = {f: np.nanmax(np.append(_metric(windows, f"psi/{f}"), -1.0)) for f in features}
    shown = sorted(features, key=lambda f: -peaks[f])[:MAX_FEATURES]
    for feature in sorted(shown):
        ax.plot(x, _metric(windows, f"psi/{feature}"), marker="o", ms=3, label=feature)
    if len(features) > len(shown):
        ax.plot([], [], " ", label=f"+{len(features) - len(shown)} features with lower peaks")
    if features:
        ax.axhline(0.25, color="grey", lw=0.8, ls="--", label="0.25: significant shift")
    _legend_or_note(ax, "no drift window judged yet (the first windows learn the reference)")


def _loss(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "loss of the last step")
    parts = sorted({p for r in history.status for p in (r.get("loss") or {})}, key=lambda p: (p != "total", p))
    for part in parts:
        values = np.array([_num((r.get("loss") or {}).get(part)) for r in history.status])
        ax.plot(frame.samples, values, lw=2.0 if part == "total" else 1.0, label=part)
    _legend_or_note(ax, "no training step yet")


def _throughput(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "per second")
    status = history.status
    ax.plot(frame.samples, _column(status, "samples_per_s"), color="C0", label="samples trained / s")
    ax.plot(frame.samples, _rate(status, "events"), color="C2", lw=1.0, label="events consumed / s")
    right = ax.twinx()
    right.set_ylabel("consumer lag (messages)")
    right.plot(frame.samples, _column(status, "lag"), color="C3", lw=1.0, ls="--", label="consumer lag")
    right.set_ylim(bottom=0)
    _legend_or_note(ax, "no status rows", extra=right)


def _freshness(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "seconds")
    freshness = _column(history.status, "freshness_s")
    if np.isfinite(freshness).any() and np.nanmedian(freshness) > 86_400:
        # A simulated or replayed clock (the demo's starts on 2026-01-01): the wall-clock
        # age of the events measures that clock, not the pipeline.
        ax.text(0.01, 0.97, f"freshness not drawn: event time is not wall time in this run "
                f"(median {np.nanmedian(freshness) / 86_400:,.0f} days)", transform=ax.transAxes, va="top",
                fontsize=8, color="grey")
    else:
        ax.plot(frame.samples, freshness, color="C4", marker=".", ms=3, label="freshness")
    ax.plot(frame.samples, _column(history.status, "join_latency_s"), color="C5", marker=".", ms=3,
            label="join latency")
    ax.set_ylim(bottom=0)
    _legend_or_note(ax, "no latency recorded yet")


def _timeline(fig: Figure, frame: _Frame, history: History, curves: Curves) -> None:
    ax = frame.axes(fig, "")
    ax.set_yticks([0, 1, 2], ["versions", "checkpoints", "gate"])
    ax.set_ylim(-0.6, 2.9)
    for start, end, state in _gate_spans(history.status):
        ax.broken_barh([(start, end - start)], (1.8, 0.4), color=FROZEN_COLOR if state == "frozen" else "C2",
                       alpha=0.35 if state == "frozen" else 0.2, lw=0)
    events = history.events
    for kind, y, style, label in (("checkpoint", 1, dict(marker="|", ms=14, color="C0"), "checkpoint"),
                                  ("checkpoint_failed", 1, dict(marker="x", ms=8, color=FROZEN_COLOR), "checkpoint failed"),
                                  ("version", 0, dict(marker="^", ms=8, color="C2"), "CURRENT version")):
        xs = [e["samples"] for e in events if e.get("kind") == kind]
        if xs:
            ax.plot(xs, [y] * len(xs), ls="none", label=label, **style)
    versions = [e for e in events if e.get("kind") == "version"]
    for e in versions[:: max(1, len(versions) // 12)]:
        ax.annotate(str(e.get("name")), (e["samples"], 0), xytext=(0, -12), textcoords="offset points",
                    ha="center", fontsize=7)
    for e in events:
        if e.get("kind") == "start" and e.get("samples"):
            ax.axvline(e["samples"], color="grey", ls="--", lw=0.8)
            ax.annotate("restart", (e["samples"], 2.6), fontsize=7, color="grey", ha="left")
    for e in events:
        if e.get("kind") == "gate":
            frozen = e.get("to") == "frozen"
            ax.plot([e["samples"]], [2], ls="none", marker="v" if frozen else "o",
                    color=FROZEN_COLOR if frozen else "C2", ms=7)
            text = textwrap.shorten(f"{'FROZEN' if frozen else 'OPEN'}: {e.get('reason', '')}", 70)
            # freezes above the bar, reopenings below it: a short freeze's two notes do not overlap
            ax.annotate(text, (e["samples"], 2), xytext=(4, 9 if frozen else -15), textcoords="offset points",
                        fontsize=7, color=FROZEN_COLOR if frozen else "C2")
    ax.plot([], [], color="C2", alpha=0.3, lw=8, label="gate OPEN")
    ax.plot([], [], color=FROZEN_COLOR, alpha=0.4, lw=8, label="gate FROZEN")
    _legend_or_note(ax, "no status rows")


_VIEWS: Sequence[tuple[Plot, Callable[[Figure, _Frame, History, Curves], None]]] = (
    (Plot("auc", "Streaming AUC per window vs oracle and baselines",
          "Prequential window AUC of the CTR and CTCVR heads (scored before training on each row), the "
          "simulator's oracle on the same windows (dashed, demo runs) and baseline curves from baselines.jsonl."),
     _auc),
    (Plot("labels", "Label ratios per window", "CTR and CVR of each label-ratio window against the monitor's "
          "baseline (dotted, learnt from good windows only)."), _labels),
    (Plot("psi", "Feature drift: PSI per feature", "Population stability index of each watched feature's window "
          "against the reference (the first windows learn it); the dashed line is the usual significant-shift mark, "
          "monitors.feature_drift.max_psi's default."), _psi),
    (Plot("loss", "Training loss", "Loss of the last training step by part, one point per status row."), _loss),
    (Plot("throughput", "Throughput and consumer lag", "Samples trained and events consumed per second, and "
          "messages behind the end of the topic (the embedded broker under-reports lag)."), _throughput),
    (Plot("freshness", "Freshness and join latency", "Freshness: mean wall time from an event's timestamp "
          "to the model having trained on it, per status interval (meaningful where event time is wall time; "
          "the demo's simulated clock starts in the past). Join latency: mean event time from an exposure to "
          "the watermark that released its sample, i.e. the label-window wait."), _freshness),
    (Plot("timeline", "Gate, checkpoints and published versions", "Gate transitions with their reasons "
          "(FROZEN spans shaded on every view), checkpoints written, CURRENT version changes, restarts."),
     _timeline),
)
PLOTS: tuple[Plot, ...] = tuple(plot for plot, _ in _VIEWS)


# ---------------------------------------------------------------------------- helpers
def _num(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _column(rows: Sequence[Row], key: str) -> np.ndarray:
    return np.array([_num(r.get(key)) for r in rows], dtype=np.float64)


def _metric(windows: Sequence[Row], key: str) -> np.ndarray:
    return np.array([_num((w.get("metrics") or {}).get(key)) for w in windows], dtype=np.float64)


def _rate(status: Sequence[Row], key: str) -> np.ndarray:
    """Per-second rate of a counter between consecutive rows (NaN where it went back: a restart)."""
    t, v = _column(status, "t"), _column(status, key)
    rate = np.full(len(status), np.nan)
    if len(status) >= 2:
        dt, dv = np.diff(t), np.diff(v)
        ok = (dt > 0) & (dv >= 0)
        rate[1:][ok] = dv[ok] / dt[ok]
    return rate


def _gate_spans(status: Sequence[Row]) -> list[tuple[float, float, str]]:
    """(start, end, state) over samples for each run of status rows with one gate state; a
    span ends where the next one starts (at the first row that saw the new state)."""
    spans: list[tuple[float, float, str]] = []
    for row in status:
        state, at = str(row.get("gate")), float(row["samples"])
        if spans and spans[-1][2] == state:
            spans[-1] = (spans[-1][0], at, state)
        else:
            if spans:
                spans[-1] = (spans[-1][0], at, spans[-1][2])
            spans.append((at, at, state))
    return spans


def _legend_or_note(ax: Axes, empty: str, extra: Axes | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if extra is not None:
        more = extra.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    drawn = any(len(line.get_xdata()) and np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any()
                for a in (ax, extra) if a is not None for line in a.get_lines()
                if not str(line.get_label()).startswith("_"))  # reference lines (AUC 0.5) are not data
    if not drawn:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")
    if handles:
        ax.figure.legend(handles, labels, loc="upper left", bbox_to_anchor=LEGEND_AT, fontsize=8, frameon=False)
