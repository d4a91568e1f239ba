"""Write ``joiner_state_v1_poisoned.{json,npz}``: a joiner state in format 1, poisoned.

Format 1 is what the joiner wrote before the clock guard (commit e3b67c3 and older), so
this must run against that code, not the current one::

    git worktree add /tmp/v1 e3b67c3
    PYTHONPATH=/tmp/v1 python tests/data/make_joiner_state_v1.py tests/data

One partition, 40 exposures a second apart from 2026-01-01, then one exposure dated
2099-01-01: the old joiner trusted it, so the saved partition max *and* the watermark
are in 2099 and every later event of the partition would be ``too_late``.
``tests/test_joiner_hostile.py`` loads it and checks the restart is not poisoned.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import orjson

from consumers.config import DecoderConfig, JoinerConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.popularity import InProcessPopularity
from consumers.state import flatten_state

T0 = 1_767_225_600_000
Y2099 = 4_070_908_800_000
# The dims must equal the test's config (history 8, 3 negatives, default features).
CONFIG = JoinerConfig(click_window_ms=30_000, convert_window_ms=60_000, allowed_lateness_ms=2_000,
                      stats_refresh_ms=20_000, history_len=8, num_random_negatives=3, item_pool_size=64)


def main(out: Path) -> None:
    events = [{"event_id": f"v1-{i}", "type": "exposure", "ts": T0 + i * 1000, "user_id": f"u{i % 3}",
               "item_id": f"i{i % 7}", "request_id": f"v1-r{i}"} for i in range(40)]
    events.append({"event_id": "v1-poison", "type": "exposure", "ts": Y2099, "user_id": "u0", "item_id": "i0",
                   "request_id": "v1-poison"})
    decoder = EventDecoder(DecoderConfig(), CONFIG.sparse_features, CONFIG.dense_features)
    joiner = LabelJoiner(CONFIG, InProcessPopularity(PopularityConfig()))
    joiner.assign([0])
    decoded = decoder.decode([orjson.dumps(e) for e in events], [0] * len(events), list(range(len(events))))
    joiner.ingest(decoded.events)
    joiner.advance()
    doc, arrays = flatten_state(joiner.state_dict())
    (out / "joiner_state_v1_poisoned.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    np.savez_compressed(out / "joiner_state_v1_poisoned.npz", **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
