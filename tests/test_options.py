"""options: strict dict -> dataclass, and YAML mappings with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fundus_edge.errors import UserError
from fundus_edge.options import load_yaml_mapping, options_from_dict


@dataclass
class _Opts:
    a: int = 1
    b: str = "x"


def test_options_from_dict():
    assert options_from_dict(_Opts, {"a": 2}, "demo") == _Opts(a=2)
    with pytest.raises(UserError, match=r"unknown demo option 'c' \(known: a, b\)"):
        options_from_dict(_Opts, {"a": 2, "c": 3}, "demo")
    with pytest.raises(UserError, match="must be a mapping"):
        options_from_dict(_Opts, [1], "demo")  # type: ignore[arg-type]


def test_load_yaml_mapping(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\nb: [1, 2]\n")
    assert load_yaml_mapping(good) == {"a": 1, "b": [1, 2]}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml_mapping(empty) == {}
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: not valid YAML") as exc:
        load_yaml_mapping(bad)
    assert "\n" not in str(exc.value)
    seq = tmp_path / "seq.yaml"
    seq.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_yaml_mapping(seq)
    with pytest.raises(UserError, match=r"--profile .*nope\.yaml: no such file"):
        load_yaml_mapping(tmp_path / "nope.yaml", "--profile")
