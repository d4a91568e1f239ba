"""Config: precedence, unknown keys, and one readable line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtrain.config import ConfigError, StreamtrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_hash_is_stable() -> None:
    a, b = load_config(environ={}), load_config(environ={})
    assert a == StreamtrainConfig()
    assert a.config_hash() == b.config_hash()
    assert load_config(environ={}, overrides=["trainer.seed=1"]).config_hash() != a.config_hash()


def test_shipped_default_yaml_matches_the_defaults_and_the_generator() -> None:
    from streamtrain.config_docs import render_default_config

    shipped = REPO / "configs" / "default.yaml"
    assert load_config(shipped, environ={}) == StreamtrainConfig()
    assert shipped.read_text() == render_default_config(), (
        "configs/default.yaml is stale: run `python -m streamtrain.config_docs > configs/default.yaml`")


def test_configuration_reference_is_generated_from_the_models() -> None:
    from streamtrain.config_docs import render_config_reference

    reference = render_config_reference()
    assert (REPO / "docs" / "configuration.md").read_text() == reference, (
        "docs/configuration.md is stale: run `python -m streamtrain.config_docs --markdown > docs/configuration.md`")
    # Every field of every section is in it, with its default: the reference cannot skip one.
    def leaves(doc: dict, path: str = "") -> list[str]:
        return [p for k, v in doc.items() for p in (leaves(v, f"{path}{k}.") if isinstance(v, dict) and v
                                                    and k != "client_overrides" else [f"{path}{k}"])]
    for dotted in leaves(StreamtrainConfig().to_dict()):
        assert f"| `{dotted}` |" in reference, dotted


def test_multi_line_field_comments_are_kept_whole() -> None:
    """A comment that wraps onto the next line belongs to the field it starts on."""
    from streamtrain.config_docs import render_config_reference

    assert "it bounds pipeline latency (measured p50" in render_config_reference()


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  batch_size: 10\n  seed: 5\nkafka:\n  group_id: from-file\n")
    env = {"STREAMTRAIN_TRAINER__BATCH_SIZE": "20", "STREAMTRAIN_KAFKA__GROUP_ID": "from-env", "STREAMTRAIN_CACHE": "/x"}
    cfg = load_config(path, environ=env, overrides=["trainer.batch_size=30"])
    assert cfg.trainer.batch_size == 30  # flag beats env beats file
    assert cfg.kafka.group_id == "from-env"
    assert cfg.trainer.seed == 5  # file beats default
    assert cfg.trainer.learning_rate == StreamtrainConfig().trainer.learning_rate


def test_every_problem_gets_one_line_naming_field_and_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kafka:\n  start: middle\n  bogus: 1\ntrainer:\n  batch_size: -3\nnope: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    text = str(info.value)
    assert "kafka.start: Input should be 'earliest' or 'latest'" in text
    assert "kafka.bogus: unknown key (allowed: " in text and "group_id" in text
    assert "trainer.batch_size: Input should be greater than or equal to 1" in text
    assert "nope: unknown key" in text


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad, environ={})


def test_feature_names_must_be_scoped() -> None:
    with pytest.raises(ConfigError, match="features.sparse"):
        load_config(environ={}, overrides=["features.sparse=[segment]"])


def test_malformed_set_flag() -> None:
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(environ={}, overrides=["trainer.batch_size"])
