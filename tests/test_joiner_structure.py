"""The joiner's building blocks on their own: the event batch and its state, the id
windows, the open-exposure index — and the rule that no consumers module reaches into
another object's private attributes."""

from __future__ import annotations

import ast
import io
from collections import deque
from pathlib import Path

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.dedupe import NEW, DedupeWindow
from consumers.joinindex import OpenExposures
from consumers.negatives import ItemPool
from consumers.schema import EventBatch
from consumers.state import flatten_state, states_equal, unflatten_state

CONSUMERS = Path(__file__).resolve().parents[1] / "consumers"


def test_event_batch_state_round_trips_through_a_pickle_free_store() -> None:
    raw = np.empty(3, object)
    raw[:] = [b'{"a":1}', None, b""]
    batch = EventBatch(ts=np.array([3, 1, 2], np.int64), etype=np.array([1, 2, 3], np.int8), eid=np.arange(3, dtype=np.int64),
                       user=np.arange(3, dtype=np.int64) + 10, item=np.arange(3, dtype=np.int64) + 20,
                       key=np.arange(3, dtype=np.int64) + 30, partition=np.array([0, 1, 0], np.int32),
                       offset=np.array([5, 6, 7], np.int64), sparse=np.arange(6, dtype=np.int64).reshape(3, 2),
                       dense=np.array([[0.5], [np.nan], [2.0]], np.float32), raw=raw)
    for original in (batch, EventBatch.empty(2, 1), batch.take(np.array([1]))):
        doc, arrays = flatten_state({"events": original.state_dict()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        buf.seek(0)
        with np.load(buf, allow_pickle=False) as npz:
            state = unflatten_state(orjson.loads(orjson.dumps(doc)), {k: npz[k] for k in npz.files})
        restored = EventBatch.from_state(state["events"], 2, 1)
        for name in ("ts", "etype", "eid", "user", "item", "key", "partition", "offset", "sparse", "dense"):
            assert states_equal(getattr(restored, name), getattr(original, name)), name
        assert restored.raw.tolist() == original.raw.tolist()
    state = batch.state_dict()
    batch.ts[0] = 99
    assert state["ts"][0] == 3  # a copy, never a live reference


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(1, 12), max_size=60), capacity=st.integers(1, 6), split=st.integers(0, 60))
def test_dedupe_window_claims_like_a_plain_fifo(ids: list[int], capacity: int, split: int) -> None:
    """Vectorised claims, in any batching, equal the obvious one-at-a-time FIFO."""
    window = DedupeWindow(capacity)
    tags = np.arange(len(ids), dtype=np.int64) % 3
    got = np.concatenate([window.claim_all(np.array(ids[:split], np.int64), tags[:split]),
                          window.claim_all(np.array(ids[split:], np.int64), tags[split:])])
    order: deque[int] = deque()
    first_tag: dict[int, int] = {}
    expected = []
    for event_id, tag in zip(ids, tags.tolist()):
        if event_id in first_tag:
            expected.append(first_tag[event_id])
            continue
        expected.append(NEW)
        first_tag[event_id] = tag
        order.append(event_id)
        if len(order) > capacity:
            del first_tag[order.popleft()]
    assert got.tolist() == expected
    restored = DedupeWindow(capacity)
    restored.load_state_dict(window.state_dict())
    probe = np.array(sorted(set(ids)), np.int64)
    assert DedupeWindow(capacity, window.ids().tolist(), window.tags().tolist()).claim_all(probe).tolist() == \
        restored.claim_all(probe).tolist()


def test_open_exposures_keep_every_row_of_a_shared_pair_in_order() -> None:
    index = OpenExposures()
    index.add(np.array([7, 8]), np.array([1, 2]))  # all new: the bulk path
    index.add(np.array([7, 7]), np.array([3, 4]))  # a shared pair
    assert list(index.rows(7)) == [1, 3, 4] and list(index.rows(8)) == [2] and list(index.rows(9)) == []
    index.remove(np.array([7, 8]), np.array([3, 2]))
    assert list(index.rows(7)) == [1, 4] and list(index.rows(8)) == []
    index.remove(np.array([7]), np.array([1]))
    assert list(index.rows(7)) == [4]
    rebuilt = OpenExposures()
    rebuilt.rebuild(np.array([7, 7]), np.array([5, 6]))
    assert list(rebuilt.rows(7)) == [5, 6]


def _private_names_defined_here() -> set[str]:
    """Every ``_name`` a consumers module defines (attributes, methods, module globals)."""
    names: set[str] = set()
    for path in CONSUMERS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_consumers_module_reads_another_objects_private_attributes() -> None:
    private = _private_names_defined_here()
    offences = []
    for path in sorted(CONSUMERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    offences.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("consumers"):
                offences += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                             if a.name.startswith("_")]
    assert offences == []


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.integers(1, 50), max_size=40), size=st.integers(1, 8), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_item_pool_ring_does_not_depend_on_how_its_input_was_chunked(items: list[int], size: int, cuts: list[int]) -> None:
    """The joiner observes one chunk per segment, and its segments follow its advances;
    a chunk longer than the ring used to land at other places than the same items fed
    in smaller chunks, so the negatives depended on when the joiner advanced."""
    whole, chunked = ItemPool(size), ItemPool(size)
    whole.observe(np.array(items, np.int64))
    bounds = [0, *sorted(min(c, len(items)) for c in cuts), len(items)]
    for lo, hi in zip(bounds, bounds[1:]):
        chunked.observe(np.array(items[lo:hi], np.int64))
    assert states_equal(whole.state_dict(), chunked.state_dict())
