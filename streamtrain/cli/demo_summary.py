"""The demo's closing summary for a person: one table, rounded, with units and paths.

``--json`` prints the same result as one JSON object instead (unrounded, for machines).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text


def summary_table(result: Mapping[str, Any], *, duration_s: float, checkpoints: str, published: str) -> Table:
    """``result``: the demo's JSON summary; ``checkpoints`` / ``published``: where those went."""
    table = Table(title=f"streamtrain demo · {duration_s:.0f} s", title_justify="left",
                  show_header=False, box=None, padding=(0, 2), title_style="bold")
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    table.add_row("events", f"{result['events']:,} produced · {result['events_consumed']:,} consumed · "
                            f"{result['dlq']:,} dead-lettered")
    table.add_row("samples trained", f"{result['samples']:,} in {result['steps']:,} steps · "
                                     f"{result['samples_per_s']:,.0f} samples/s")
    rows = f" · on the same {result['auc_rows']:,} rows" if result.get("auc_rows") else ""
    table.add_row("AUC (CTR)", _versus(result.get("auc"), result.get("oracle_auc")) + rows)
    if "ctcvr_auc" in result:
        table.add_row("AUC (CTCVR)", _versus(result.get("ctcvr_auc"), result.get("oracle_ctcvr_auc")))
    gate = str(result["gate"]).upper()
    table.add_row("gate", Text(gate, style="bold green" if gate == "OPEN" else "bold red"))
    failed = f" ({result['checkpoint_failures']} failed)" if result.get("checkpoint_failures") else ""
    table.add_row("checkpoints", f"{result['checkpoints']} written{failed} → {checkpoints}")
    table.add_row("published", f"{result['published_versions']} versions → {published}")
    table.add_row("report", str(result["report"]) if result.get("report") else "not written (--no-report)")
    return table


def _versus(model: float | None, oracle: float | None) -> str:
    """``0.712 model · 0.930 oracle`` (AUC to 3 decimals; "–" where there is none)."""
    def auc(value: float | None) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "–"

    return f"{auc(model)} model · {auc(oracle)} oracle"
