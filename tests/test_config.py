"""Configuration: precedence (flags > environment > file > defaults) and precise errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import pytest

from kipvs.shared import config


class Example(config.CommonConfig, kw_only=True, forbid_unknown_fields=True):
    period: Annotated[float, config.describe("seconds"), msgspec.Meta(gt=0)] = 30.0
    nodes: Annotated[list[str], config.describe("node names")] = []


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("period: 5\nlog_level: debug\nnats_url: nats://127.0.0.1:1\n")
    env = {"KIPVS_PERIOD": "7", "NATS_URL": "nats://127.0.0.1:2", "KIPVS_NODES": "a,b"}
    got = config.load(Example, {"config": str(f), "period": "9"}, env)
    assert got.period == 9.0  # flag
    assert got.nats_url == "nats://127.0.0.1:2"  # standard environment name over the file
    assert got.log_level == "debug"  # file
    assert got.nodes == ["a", "b"]
    assert config.load(Example, {}, {}).period == 30.0


def test_bad_value_names_setting_and_source() -> None:
    with pytest.raises(config.ConfigError, match=r"from environment variable KIPVS_PERIOD.*\$\.period"):
        config.load(Example, {}, {"KIPVS_PERIOD": "soon"})
    with pytest.raises(config.ConfigError, match=r"from flag --period.*>= ?0|from flag --period.*> 0"):
        config.load(Example, {"period": "-1"}, {})


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("perod: 5\n")
    with pytest.raises(config.ConfigError, match=r"unknown setting 'perod' in config file .*known settings: .*period"):
        config.load(Example, {"config": str(f)}, {})


@pytest.mark.parametrize(("text", "match"), [("[1, 2]", "must hold a mapping"), ("a: [", "not valid YAML")])
def test_malformed_file(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=match):
        config.load(Example, {"config": str(f)}, {})


def test_missing_file_and_bad_choice() -> None:
    with pytest.raises(config.ConfigError, match="cannot read config file /nonexistent"):
        config.load(Example, {"config": "/nonexistent"}, {})
    with pytest.raises(config.ConfigError, match=r"log_format"):
        config.load(Example, {"log_format": "xml"}, {})
    with pytest.raises(config.ConfigError, match="host:port"):
        config.load(Example, {"http_listen": "nope"}, {})
