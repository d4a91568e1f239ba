"""Read timestamped interaction logs into columns: MovieLens, CSV, Parquet.

Every reader returns :class:`Interactions` — one row per interaction, with the line of
the source it came from (for error messages and stable event ids). A row that cannot be
read raises :class:`ReplayError` naming the file and line, unless the caller allows some
bad rows (``max_bad_rows``), which are then skipped and reported.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

TimeUnit = Literal["s", "ms"]
_MS_PER = {"s": 1000, "ms": 1}


class ReplayError(ValueError):
    """The log cannot be replayed as asked; the message names the file and line."""


@dataclass(frozen=True)
class Columns:
    """Which source columns hold the user, item, timestamp and (optional) rating."""

    user: str = "user"
    item: str = "item"
    ts: str = "timestamp"
    rating: str | None = "rating"
    ts_unit: TimeUnit = "s"


@dataclass
class Interactions:
    user: np.ndarray  # (n,) object: str ids
    item: np.ndarray  # (n,) object: str ids
    ts_ms: np.ndarray  # (n,) int64 ms since epoch
    rating: np.ndarray  # (n,) float64, NaN where the log has none
    line: np.ndarray  # (n,) int64 1-based line (CSV/MovieLens) or row number (Parquet)
    bad_rows: list[str] = field(default_factory=list)  # "<file>:<line>: why", skipped

    def __len__(self) -> int:
        return len(self.ts_ms)


MOVIELENS_COLUMNS = Columns(user="user", item="item", ts="timestamp", rating="rating", ts_unit="s")


def read_movielens(path: Path, max_bad_rows: int = 0) -> Interactions:
    """MovieLens ratings: ``user item rating timestamp`` (seconds), tab separated (ml-100k
    ``u.data``), ``::`` separated (ml-1m/10m ``ratings.dat``) or a CSV with a header
    ``userId,movieId,rating,timestamp`` (ml-latest ``ratings.csv``)."""
    data = path.read_bytes()
    first = data.split(b"\n", 1)[0]
    if first.lower().startswith(b"userid,"):
        columns = Columns(user="userId", item="movieId", ts="timestamp", rating="rating", ts_unit="s")
        return read_csv_bytes(data, path, columns, delimiter=",", header=True, max_bad_rows=max_bad_rows)
    if b"::" in first:
        data = data.replace(b"::", b"\t")  # one-byte delimiter for the CSV reader; lines stay lines
    names = ["user", "item", "rating", "timestamp"]
    return read_csv_bytes(data, path, MOVIELENS_COLUMNS, delimiter="\t", header=False, names=names,
                          max_bad_rows=max_bad_rows)


def read_csv(path: Path, columns: Columns, delimiter: str = ",", max_bad_rows: int = 0) -> Interactions:
    """A CSV (or TSV) with a header row naming at least ``columns``' fields."""
    return read_csv_bytes(path.read_bytes(), path, columns, delimiter=delimiter, header=True, max_bad_rows=max_bad_rows)


def read_csv_bytes(data: bytes, path: Path, columns: Columns, *, delimiter: str, header: bool,
                   names: list[str] | None = None, max_bad_rows: int = 0) -> Interactions:
    bad: list[str] = []
    skipped_lines: list[int] = []
    skip = 1 if header else 0

    def invalid(row: pacsv.InvalidRow) -> str:
        # row.number is the 1-based line in the file (header included).
        skipped_lines.append(row.number)
        bad.append(f"{path}:{row.number}: expected {row.expected_columns} fields, got {row.actual_columns}: "
                   f"{row.text[:80]!r}")
        return "skip"

    wanted = [c for c in (columns.user, columns.item, columns.ts, columns.rating) if c is not None]
    # One thread: the reader then knows the line of every invalid row (it reports None otherwise).
    read_options = pacsv.ReadOptions(column_names=names, use_threads=False) if names else pacsv.ReadOptions(use_threads=False)
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=read_options,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in wanted}, include_columns=wanted),
        )
    except (pa.ArrowInvalid, KeyError) as exc:
        raise ReplayError(f"{path}: {_first_line(exc)}") from None
    _check_bad(bad, max_bad_rows)
    # Lines of the kept rows: the file's data lines without the skipped ones.
    skipped = np.array(sorted(skipped_lines), np.int64)
    lines = np.arange(1 + skip, table.num_rows + len(skipped) + 1 + skip, dtype=np.int64)
    lines = lines[~np.isin(lines, skipped)]
    return _typed(table, columns, lines, path, bad, max_bad_rows)


def read_parquet(path: Path, columns: Columns, max_bad_rows: int = 0) -> Interactions:
    """A Parquet file; ``line`` is the 1-based row number."""
    wanted = [c for c in (columns.user, columns.item, columns.ts, columns.rating) if c is not None]
    try:
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise ReplayError(f"{path}: {_first_line(exc)}") from None
    table = table.cast(pa.schema([(c, pa.string()) for c in wanted]))
    return _typed(table, columns, np.arange(1, table.num_rows + 1, dtype=np.int64), path, [], max_bad_rows)


def _typed(table: pa.Table, columns: Columns, lines: np.ndarray, path: Path, bad: list[str],
           max_bad_rows: int) -> Interactions:
    """String columns -> typed arrays; rows with an empty id or a non-numeric ts/rating are bad rows."""
    user = table.column(columns.user).to_numpy(zero_copy_only=False)
    item = table.column(columns.item).to_numpy(zero_copy_only=False)
    ts_num = _numbers(table.column(columns.ts))
    rating = _numbers(table.column(columns.rating)) if columns.rating is not None else np.full(len(user), np.nan)
    ok = np.ones(len(user), bool)
    problems = [
        (np.array([u is None or not str(u).strip() for u in user], bool), f"empty {columns.user}"),
        (np.array([i is None or not str(i).strip() for i in item], bool), f"empty {columns.item}"),
        (~np.isfinite(ts_num), f"{columns.ts} is not a number"),
    ]
    if columns.rating is not None:
        problems.append((~np.isfinite(rating), f"{columns.rating} is not a number"))
    for mask, why in problems:
        for i in np.flatnonzero(mask & ok).tolist():
            bad.append(f"{path}:{int(lines[i])}: {why}")
        ok &= ~mask
    _check_bad(bad, max_bad_rows)
    ts_ms = np.round(ts_num[ok] * _MS_PER[columns.ts_unit]).astype(np.int64)
    return Interactions(user=user[ok].astype(str).astype(object), item=item[ok].astype(str).astype(object),
                        ts_ms=ts_ms, rating=rating[ok], line=lines[ok], bad_rows=bad)


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """Strings -> float64, NaN where a value is not a number (vectorised; per value only
    when some value does not parse, to find which)."""
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out = np.full(len(column), np.nan)
    for i, value in enumerate(column.to_pylist()):
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _check_bad(bad: list[str], max_bad_rows: int) -> None:
    if len(bad) > max_bad_rows:
        allowed = f" (allowed: {max_bad_rows}; raise --max-bad-rows to skip them)" if max_bad_rows else \
            " (pass --max-bad-rows N to skip up to N such rows)"
        raise ReplayError(f"{bad[max_bad_rows]}{allowed}")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
