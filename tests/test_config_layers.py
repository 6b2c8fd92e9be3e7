"""The one layered loader (fundus_edge.layered.resolve) serving export profiles and the
benchmark suite: defaults <- the file <- the command line, errors naming the file and key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from fundus_edge.errors import UserError
from fundus_edge.layered import apply_overrides, check_layer, flatten, plain, resolve


@dataclass
class _Inner:
    size: int = 4
    names: tuple[str, ...] = ("a",)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise UserError(f"'size' must be >= 1, got {self.size}")


@dataclass
class _Outer:
    lr: float = 0.1
    inner: _Inner = field(default_factory=_Inner)
    note: str | None = None


def test_resolve_layers_defaults_types_and_the_dataclasses_own_checks():
    cfg = resolve(_Outer, [("a.yaml", {"inner": {"size": 8}}), ("--set", {"lr": "1e-3"})])
    assert cfg == _Outer(lr=0.001, inner=_Inner(size=8))
    assert resolve(_Outer, [("x", {"inner.names": "p,q"})]).inner.names == ("p", "q")
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}
    with pytest.raises(UserError, match=r"^b\.yaml: unknown key inner\.sise"):
        resolve(_Outer, [("a.yaml", {}), ("b.yaml", {"inner": {"sise": 1}})])
    with pytest.raises(UserError, match=r"^--set: lr: expected float, got 'fast'"):
        resolve(_Outer, [("--set", {"lr": "fast"})])
    with pytest.raises(UserError, match=r"^a\.yaml: inner: 'size' must be >= 1, got 0"):
        resolve(_Outer, [("a.yaml", {"inner.size": 0})])
    # one layer alone: keys and types only (a check relating fields waits for the merge)
    assert check_layer(_Outer, {"inner.size": 0}, "a.yaml") == {"inner": {"size": 0}}


def test_one_flatten_and_plain_for_configs_and_trackers():
    # flatten: any mapping, lists stay values, empty mappings vanish, dotted keys kept whole
    tree = {"optim": {"lr": 1e-3, "loss": {"name": "focal"}}, "data": {}, "model.members": ["a"]}
    flat = flatten(MappingProxyType(tree))
    assert flat == {"optim.lr": 1e-3, "optim.loss.name": "focal", "model.members": ["a"]}
    assert apply_overrides({}, flat) == {
        "optim": {"lr": 1e-3, "loss": {"name": "focal"}}, "model": {"members": ["a"]},
    }  # fmt: skip
    assert flatten({"a": {"b": 1}}, "p.") == {"p.a.b": 1}
    # plain: dataclasses all the way down, text keys, tuples as lists, other objects as text
    got = plain({"outer": _Outer(note="n"), 3: (Path("/x"), None, True, 2, 0.5)})
    assert got == {
        "outer": {"lr": 0.1, "inner": {"size": 4, "names": ["a"]}, "note": "n"},
        "3": ["/x", None, True, 2, 0.5],
    }
    assert yaml.safe_load(yaml.safe_dump(got)) == got == json.loads(json.dumps(got))


def test_export_profile_then_command_line_through_the_layered_loader(tmp_path):
    from fundus_edge.convert.export_config import load_profile, resolve_export

    prof = tmp_path / "p.yaml"
    prof.write_text("description: x\nprecision: fp16\nbatch: [1, 2, 4]\ncalib_count: 16\n")
    cfg = resolve_export("m.onnx", prof, {"calib_count": 8}, {"name": "m", "out": "o"})
    assert (cfg.precision, cfg.batch, cfg.calib_count, cfg.name, cfg.out) == (
        "fp16",
        (1, 2, 4),
        8,
        "m",
        "o",
    )
    assert cfg.profile == str(prof) and set(cfg.profile_keys) == {"precision", "batch"}
    assert resolve_export("m.onnx", prof, {"name": "n"}, {"name": "m"}).name == "n"
    prof.write_text("opset: seventeen\n")
    with pytest.raises(UserError, match=rf"^{prof}: opset: expected int, got 'seventeen'"):
        load_profile(prof)
    prof.write_text("profile_keys: [format]\n")
    with pytest.raises(UserError, match=r"profile_keys: set by export itself"):
        load_profile(prof)
    prof.write_text("precision: int9\n")
    with pytest.raises(UserError, match=rf"precision: 'int9' in --profile {prof}: choose"):
        resolve_export("m.onnx", prof, {})
    with pytest.raises(UserError, match=r"--precision 'int9': choose"):
        resolve_export("m.onnx", None, {"precision": "int9"})


def test_bench_suite_and_scenario_options_through_the_layered_loader(tmp_path):
    pytest.importorskip("torch")
    from pipelined import PipelinedOptions  # bench/pipelined.py
    from suite import PrecisionOptions, load_suite  # bench/suite.py

    p = tmp_path / "s.yaml"
    p.write_text(
        "name: x\nmodel: {members: [resnet18], image_size: 64}\n"
        "scenarios:\n  precision: {rounds: 2, calib_images: 4}\n  pipelined: {frames: 2}\n"
    )
    cfg = load_suite(p)
    assert cfg.members == ("resnet18",) and cfg.image_size == 64
    assert cfg.scenarios["precision"] == PrecisionOptions(rounds=2, calib_images=4)
    assert cfg.scenarios["pipelined"] == PipelinedOptions(frames=2)  # declared in its own file
    assert cfg.to_dict()["scenarios"]["precision"]["calib_method"] == "minmax"
    for body, message in [
        ("scenarios:\n  precision: {calib_imagez: 2}\n", "scenarios.precision: unknown key"),
        ("scenarios:\n  training: {rounds: 0}\n", "scenarios.training: rounds: must be >= 1"),
        ("scenarios:\n  cam_overhead: {iters: x}\n", "cam_overhead: iters: expected int"),
        ("model: {image_size: big}\n", "image_size: expected int, got 'big'"),
        ("name: a\nmodel: {name: b}\n", "name: given at the top level and under model"),
    ]:
        p.write_text(body)
        with pytest.raises(UserError, match=rf"^{p}: .*{message}"):
            load_suite(p)
