"""The one config schema: dataclasses ↔ dict ↔ YAML ↔ CLI flags, strict about keys and types."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option


@dataclass
class Inner(ConfigBase):
    width: int = option(8, help="width")
    act: Literal["gelu", "relu"] = option("gelu", help="activation")


@dataclass
class Outer(ConfigBase):
    name: str = option("x", help="a name")
    lr: float = option(1e-3, help="learning rate")
    bf16: bool = option(False, help="use bf16")
    pairs: list[tuple[str, str]] = option(default_factory=list, help="pairs")
    limit: int | None = option(None, help="optional limit")
    inner: Inner = option(default_factory=Inner, help="nested")


def test_dict_round_trip_and_nested():
    cfg = Outer.from_dict({"name": "a", "lr": "0.5", "pairs": [["red", "circle"]], "inner": {"width": 3}})
    assert cfg.lr == 0.5 and cfg.pairs == [("red", "circle")] and cfg.inner == Inner(width=3)
    assert Outer.from_dict(cfg.to_dict()) == cfg


def test_yaml_round_trip(tmp_path):
    cfg = Outer(name="b", limit=4, inner=Inner(act="relu"))
    path = cfg.to_yaml(tmp_path / "c.yaml")
    assert Outer.from_yaml(path) == cfg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"nmae": "typo"}, "nmae"),
        ({"lr": "fast"}, "lr"),
        ({"bf16": "maybe"}, "bf16"),
        ({"inner": {"act": "tanh"}}, "inner.act"),
        ({"inner": {"depth": 2}}, "inner.depth"),
        ({"pairs": "red circle"}, "pairs"),
        ({"limit": 1.5}, "limit"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        Outer.from_dict(data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        Outer.from_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Outer.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        Outer.from_yaml(listy)


def test_cli_flags_override_yaml(tmp_path):
    path = Outer(name="from-yaml", lr=0.1, inner=Inner(width=5)).to_yaml(tmp_path / "c.yaml")
    parser = argparse.ArgumentParser()
    Outer.add_arguments(parser)
    args = parser.parse_args(
        ["--config", str(path), "--lr", "0.25", "--bf16", "--inner.act", "relu", "--pairs", "[[a, b]]"]
    )
    cfg = Outer.from_cli(args)
    assert cfg == Outer(name="from-yaml", lr=0.25, bf16=True, pairs=[("a", "b")], inner=Inner(width=5, act="relu"))
    # Without flags the defaults stand.
    assert Outer.from_cli(parser.parse_args([])) == Outer()


def test_cli_rejects_bad_choice():
    parser = argparse.ArgumentParser(exit_on_error=False)
    Outer.add_arguments(parser)
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args(["--inner.act", "tanh"])


@dataclass
class WithPreset(ConfigBase):
    inner: Inner = option(default_factory=lambda: Inner(width=99, act="relu"), help="a preset")


def test_partial_nested_override_keeps_the_fields_preset():
    cfg = WithPreset.from_dict({"inner": {"width": 5}})
    assert cfg.inner == Inner(width=5, act="relu")  # act from the preset, not Inner's bare default
    parser = argparse.ArgumentParser()
    WithPreset.add_arguments(parser)
    assert WithPreset.from_cli(parser.parse_args(["--inner.width", "7"])).inner == Inner(width=7, act="relu")
