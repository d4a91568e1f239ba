"""Publisher: atomic versions, CURRENT pointer, rollback, retention, damage detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtrain.runtime.publisher import Publisher, PublishError, verify_version


def test_versions_are_numbered_and_current_moves(tmp_path: Path) -> None:
    pub = Publisher(tmp_path / "published")
    assert pub.current() is None
    v1 = pub.publish({"weights.safetensors": b"one"}, {"checkpoint": "ckpt-000000000010"})
    v2 = pub.publish({"weights.safetensors": b"two"}, {"checkpoint": "ckpt-000000000020"})
    assert (v1.name, v2.name) == ("v000001", "v000002")
    assert pub.current() == pub.versions()[-1]
    assert (tmp_path / "published" / "CURRENT").read_text().strip() == "v000002"
    assert pub.current().manifest["checkpoint"] == "ckpt-000000000020"
    assert verify_version(v2) == []


def test_rollback_and_damage(tmp_path: Path) -> None:
    pub = Publisher(tmp_path)
    pub.publish({"w": b"one"}, {})
    pub.publish({"w": b"two"}, {})
    assert pub.rollback("v000001").name == "v000001"
    assert pub.current().name == "v000001"
    with pytest.raises(PublishError, match="no published version"):
        pub.rollback("v000009")
    (tmp_path / "v000002" / "w").write_bytes(b"tampered")
    with pytest.raises(PublishError, match="checksum mismatch"):
        pub.rollback("v000002")
    assert pub.current().name == "v000001"


def test_retention_keeps_the_newest_versions(tmp_path: Path) -> None:
    pub = Publisher(tmp_path, keep_versions=2)
    for i in range(3):
        pub.publish({"w": bytes([i])}, {})
    assert [v.name for v in pub.versions()] == ["v000002", "v000003"]
    pub.rollback("v000002")
    assert pub.current().name == "v000002"
    pub.publish({"w": b"x"}, {})
    assert [v.name for v in pub.versions()] == ["v000003", "v000004"]
    assert pub.current().name == "v000004"


def test_crash_leftovers_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".tmp-v000001-abc").mkdir()
    Publisher(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
