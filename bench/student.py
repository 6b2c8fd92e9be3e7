"""The suite's ``student`` scenario: a distilled one-member student against its teacher and the
paper's ensemble, every target measured in one run.

Accuracy is judged against the teacher the student was distilled from (its eval report on the
held-out split); cost against the paper's ensemble (the suite's ``model``: VGG19 + ResNet50,
two passes, 224 px), the model a user would otherwise deploy. Rows (targets in
:data:`DEFAULT_TARGETS`, each overridable in the scenario's options):

* macro AUROC student / teacher, and the pointing game within 4 % of the FOV (student vs
  teacher - 0.02), read from two eval reports (``student_eval``, ``teacher_eval``: a report
  JSON, or a checkpoint that is evaluated here on ``data`` with
  :func:`fundus_edge.evaluate.evaluate_model`); "not measured" when either is missing;
* FLOPs per frame of the exported graphs (:func:`fundus_edge.perf.roofline.count_graph`,
  passes, maps and attention included): student / teacher each as it runs (own input size and
  views), student / paper ensemble both at the suite's size;
* INT8 latency student / paper ensemble, ONNX Runtime CPU, batch 1, at the suite's size, the
  variants interleaved (FP32 rows beside them for context);
* the student's maps against the ``grad-cam`` package on the student: the export step's own
  check (``CheckpointToOnnx`` with ``verify``: ``cams_vs_gradcam``);
* the Orin Nano INT8 roofline projection of the student's whole graph (uint8 frame in,
  normalisation, passes, maps, attention out): an estimate, never a measurement;
* ``runtime.run`` FPS / model-only FPS with the student: the suite's ``pipelined`` scenario run
  on the student's graph with the ``pipelined`` options given here.

Every graph comes from the export chain's steps (:mod:`fundus_edge.convert.steps`). Cost rows
do not depend on weights: without a student checkpoint the student is ``student_model``
(an :class:`~fundus_edge.models.EnsembleConfig` mapping) at random initialisation, and the
report says so.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipelined import PipelinedOptions  # bench/pipelined.py, beside this file
from suite import (  # bench/suite.py, beside this file
    ScenarioResult,
    SuiteConfig,
    Workspace,
    check_counts,
    interleave,
    scenario_pipelined,
)

from fundus_edge.convert.steps import Artifact, CheckpointToOnnx, OnnxToInt8, StepContext
from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = ["DEFAULT_TARGETS", "StudentOptions", "run_student"]

log = get_logger("bench.student")

#: Targets of issue 15 ("Targets"), in the suite's ``">= X"`` / ``"<= X"`` form.
DEFAULT_TARGETS: dict[str, str] = {
    "auroc_ratio": ">= 0.98",  # student macro AUROC / teacher's
    "pointing_drop": "<= 0.02",  # teacher pointing game - student's
    "flops_vs_teacher": "<= 0.25",
    "flops_vs_paper": "<= 0.02",
    "int8_latency_vs_paper": "<= 0.1",
    "maps_max_abs": "<= 0.01",
    "maps_correlation": ">= 0.999",
    "orin_nano_fps": ">= 60",
    "pipelined": ">= 0.9",
}


@dataclass
class StudentOptions:
    """The ``student`` scenario's options, resolved from the suite file by the one layered
    loader (an unknown key, a wrong type or a bad target is refused before anything runs).

    Attributes:
        student: the distilled student's checkpoint; missing: ``student_model`` at random
            initialisation (cost rows only).
        student_model: :class:`~fundus_edge.models.EnsembleConfig` keys of the student.
        teacher: the teacher's checkpoint; missing: ``teacher_model``'s FLOPs, else none.
        teacher_model: EnsembleConfig keys of the teacher.
        student_eval: the student's eval report (JSON), or a model evaluated here on ``data``.
        teacher_eval: the teacher's, likewise.
        data: the dataset a model given as an eval is evaluated on (split ``split``).
        split: that split.
        rounds: timed rounds of the latency rows.
        iters: timed calls per variant and round.
        warmup: untimed calls per variant first.
        calib_images: generated images the INT8 graphs are calibrated on.
        pipelined: the ``pipelined`` scenario's options (:class:`PipelinedOptions`, no
            ``model``: it runs the student) for its rows on the student's graph; None: none.
        targets: target name (:data:`DEFAULT_TARGETS`) -> ``">= X"`` / ``"<= X"``, overriding
            the defaults.
        roofline_device: the Jetson of the roofline estimate
            (:data:`fundus_edge.perf.roofline.JETSON_PEAKS`).
    """

    student: str | None = None
    student_model: dict[str, Any] | None = None
    teacher: str | None = None
    teacher_model: dict[str, Any] | None = None
    student_eval: str | None = None
    teacher_eval: str | None = None
    data: str | None = None
    split: str = "test"
    rounds: int = 6
    iters: int = 3
    warmup: int = 2
    calib_images: int = 8
    pipelined: dict[str, Any] | None = None
    targets: dict[str, Any] | None = None
    roofline_device: str = "orin-nano-8gb-super"

    def __post_init__(self) -> None:
        check_counts(self, "rounds", "iters", "calib_images")
        bad = sorted(set(self.targets or {}) - set(DEFAULT_TARGETS))
        if bad:
            raise UserError(
                f"targets: unknown target {bad[0]!r} (known: {', '.join(DEFAULT_TARGETS)})"
            )
        for k, t in self.all_targets().items():
            parts = str(t).split()
            if len(parts) != 2 or parts[0] not in (">=", "<="):
                raise UserError(f"targets: {k} {t!r} must read '>= X' or '<= X'")
        if self.pipelined is not None:
            if self.pipelined.get("model"):
                raise UserError("pipelined.model: the student's pipelined run uses the student")
            self.pipelined_options()  # its unknown keys and types, named, before anything runs

    def all_targets(self) -> dict[str, str]:
        """:data:`DEFAULT_TARGETS` with ``targets`` over them."""
        return {**DEFAULT_TARGETS, **{k: str(v) for k, v in (self.targets or {}).items()}}

    def pipelined_options(self) -> PipelinedOptions:
        """The ``pipelined`` options of the student's run: PipelinedOptions' defaults <- the
        ``pipelined`` target (``targets.pipelined``) <- the ``pipelined`` mapping."""
        from fundus_edge.layered import resolve

        target = {"target": self.all_targets()["pipelined"]}
        layers = [("targets.pipelined", target), ("pipelined", self.pipelined or {})]
        return resolve(PipelinedOptions, layers, "pipelined")


POINTING_TOLERANCE = 0.04  # "within 4 % of the FOV": the eval report's pointing_game_tol


def _met(value: float, target: str) -> bool:
    op, bound = target.split()
    return value >= float(bound) if op == ">=" else value <= float(bound)


def _verdict(
    res: ScenarioResult,
    label: str,
    value: float | None,
    target: str,
    display: str,
    *,
    plot: bool = False,
) -> None:
    """A target row that is not a ratio of timings (no bootstrap interval); ``value`` None:
    not measured (``met`` None, ``display`` says why in a word or two)."""
    res.targets.append(
        {
            "scenario": res.name,
            "ratio": label,
            "value": value,
            "ci_low": None,
            "ci_high": None,
            "target": target,
            "met": None if value is None else _met(value, target),
            "samples": None,
            "display": display,
            "plot": plot and value is not None,
        }
    )


def _path(opts: StudentOptions, key: str) -> Path | None:
    v = getattr(opts, key)
    return None if v in (None, "") else Path(str(v)).expanduser()


class _CheckpointWorkspace(Workspace):
    """A :class:`Workspace` over an existing checkpoint (the student), so that the suite's
    scenarios run on it unchanged. Its fused graph is exported with the step's checks on
    (``verify``), which include the maps against the ``grad-cam`` package."""

    def __init__(self, cfg: SuiteConfig, root: Path, checkpoint: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(cfg, root)
        self.checkpoint = checkpoint
        self.checks: dict[str, dict[str, Any]] = {}

    @cached_property
    def ensemble_and_meta(self) -> tuple[Any, dict[str, Any], Path]:
        from fundus_edge.models import load_checkpoint

        ens, meta = load_checkpoint(self.checkpoint)
        return ens, meta, self.checkpoint

    @cached_property
    def fused(self) -> Artifact:
        ctx = StepContext(out=self.root, verify=True, seed=self.cfg.seed)
        step = CheckpointToOnnx("fused", simplify=False)
        result = step.run(Artifact("checkpoint", self.checkpoint), ctx)
        self.checks = result.checks
        return result.artifact


def _save_random(cfg: Any, path: Path) -> Path:
    """A randomly initialised ensemble of ``cfg`` saved as a checkpoint (cost rows only)."""
    import torch

    from fundus_edge.models import build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    torch.manual_seed(0)
    ens = build_ensemble(cfg).eval()
    pre = PreprocessConfig(size=cfg.image_size).to_dict()
    return save_checkpoint(path, ens, extra={"preprocess": pre})


def _config_of(checkpoint: Path) -> Any:
    from fundus_edge.models import EnsembleConfig, read_checkpoint_meta

    return EnsembleConfig.from_dict(read_checkpoint_meta(checkpoint)["config"])


def _model_config(opts: StudentOptions, key: str) -> Any:
    from fundus_edge.models import EnsembleConfig

    d = getattr(opts, key)
    if not isinstance(d, Mapping):
        raise UserError(f"student scenario: {key} must be a mapping of EnsembleConfig keys")
    return EnsembleConfig.from_dict(dict(d))


def _describe(cfg: Any) -> str:
    passes = "1 pass" if cfg.views == "original" else "2 passes"
    return (
        f"{' + '.join(cfg.members)} ({cfg.member_head} head{'s' if len(cfg.members) > 1 else ''},"
        f" {passes}, {cfg.image_size} px, {cfg.num_classes} classes)"
    )


class _Models:
    """The three models' checkpoints and configs, resolved from the options once."""

    def __init__(self, ws: Workspace, opts: StudentOptions, notes: list[str]) -> None:
        self.root = ws.root / "student"
        self.root.mkdir(parents=True, exist_ok=True)
        student = _path(opts, "student")
        if student is not None and student.is_file():
            self.student = student
        else:
            if opts.student_model is None:
                where = f"{student} does not exist and " if student is not None else ""
                raise UserError(f"student scenario: {where}no student_model is given")
            why = f"{student} does not exist" if student is not None else "no student checkpoint"
            notes.append(
                f"student: {why}: the student is student_model at random initialisation "
                "(the cost rows do not depend on weights; its maps are still checked)"
            )
            cfg = _model_config(opts, "student_model")
            self.student = _save_random(cfg, self.root / "student-random.safetensors")
        self.student_cfg = _config_of(self.student)
        teacher = _path(opts, "teacher")
        if teacher is not None and teacher.is_file():
            self.teacher: Path | None = teacher
        elif opts.teacher_model is not None:
            notes.append(
                f"student: {teacher or 'no teacher checkpoint'}"
                f"{' does not exist' if teacher else ''}: the teacher's FLOPs are "
                "teacher_model's"
            )
            self.teacher = _save_random(
                _model_config(opts, "teacher_model"), self.root / "teacher-random.safetensors"
            )
        else:
            self.teacher = None
            notes.append(
                f"student: teacher {teacher} does not exist and no teacher_model is given: "
                "FLOPs vs the teacher not measured"
            )
        self.teacher_cfg = None if self.teacher is None else _config_of(self.teacher)

    def student_at(self, size: int) -> Path:
        """The student's architecture at ``size`` px (random weights: a cost copy)."""
        if size == self.student_cfg.image_size:
            return self.student
        cfg = copy.deepcopy(self.student_cfg)
        cfg.image_size = size
        return _save_random(cfg, self.root / f"student-{size}.safetensors")


def _export(checkpoint: Path, out: Path, name: str) -> Artifact:
    out.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(out=out, verify=False)
    return (
        CheckpointToOnnx(name, simplify=False).run(Artifact("checkpoint", checkpoint), ctx).artifact
    )


def _flops(art: Artifact) -> int:
    from fundus_edge.perf.roofline import count_graph

    return count_graph(art.path, batch=1, input_size=int(art.meta["input_size"])).flops


# ---------------------------------------------------------------------------- accuracy


def _report(
    ws: Workspace, opts: StudentOptions, key: str, notes: list[str]
) -> dict[str, Any] | None:
    """The eval report named by ``opts[key]``: read from a JSON, or made by evaluating a
    checkpoint / exported model on ``data``; None (with a note) when it does not exist."""
    import json

    path = _path(opts, key)
    if path is None:
        notes.append(f"student: no {key} given: accuracy rows not measured")
        return None
    if not path.exists():
        notes.append(f"student: {key} {path} does not exist: accuracy rows not measured")
        return None
    if path.suffix.lower() == ".json":
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"student scenario: {key} {path}: not a readable JSON ({exc})") from exc
        if not isinstance(report, dict) or "macro" not in report:
            raise UserError(f"student scenario: {key} {path}: not an eval report (no 'macro')")
        report.setdefault("source", str(path))
        return report
    data = _path(opts, "data")
    if data is None:
        raise UserError(f"student scenario: {key} {path} is a model: give data to evaluate it on")
    from fundus_edge.evaluate import evaluate_model

    split = opts.split
    log.info("evaluating %s on %s (%s)", path, data, split)
    report = evaluate_model(path, data, split=split, json_path=ws.root / f"{key}.json")
    report["source"] = f"evaluated here: {path} on {data} ({split})"
    return report


def _accuracy_rows(
    res: ScenarioResult, ws: Workspace, opts: StudentOptions, targets: Mapping[str, str]
) -> None:
    st = _report(ws, opts, "student_eval", res.notes)
    te = _report(ws, opts, "teacher_eval", res.notes) if st is not None else None
    auroc_label = "macro AUROC student / teacher (held-out split)"
    pg_label = f"pointing game within {POINTING_TOLERANCE:.0%} of the FOV: teacher - student"
    if st is None or te is None:
        _verdict(res, auroc_label, None, targets["auroc_ratio"], "not measured")
        _verdict(res, pg_label, None, targets["pointing_drop"], "not measured")
        return
    differ = [k for k in ("split", "n") if k in st and k in te and st[k] != te[k]]
    if "data" in st and "data" in te and Path(st["data"]).resolve() != Path(te["data"]).resolve():
        differ.append("data")
    if differ:
        k = differ[0]
        raise UserError(
            f"student scenario: the eval reports differ in {k} ({st[k]!r} vs {te[k]!r}): "
            "student and teacher must be evaluated on the same split"
        )
    a_s, a_t = st["macro"].get("auroc"), te["macro"].get("auroc")
    if a_s is None or a_t is None:
        _verdict(res, auroc_label, None, targets["auroc_ratio"], "not measured (no AUROC)")
    else:
        r = a_s / a_t
        _verdict(res, auroc_label, r, targets["auroc_ratio"], f"{r:.4f} ({a_s:.4f} / {a_t:.4f})")
    loc_s, loc_t = st.get("localisation") or {}, te.get("localisation") or {}
    pg_s = (loc_s.get("macro") or {}).get("pointing_game_tol")
    pg_t = (loc_t.get("macro") or {}).get("pointing_game_tol")
    tol = {loc_s.get("tolerance"), loc_t.get("tolerance")}
    if pg_s is None or pg_t is None:
        _verdict(res, pg_label, None, targets["pointing_drop"], "not measured (no lesion masks)")
    elif tol != {POINTING_TOLERANCE}:
        _verdict(res, pg_label, None, targets["pointing_drop"], f"not measured (tolerance {tol})")
    else:
        d = pg_t - pg_s
        _verdict(res, pg_label, d, targets["pointing_drop"], f"{d:+.4f} ({pg_t:.4f} - {pg_s:.4f})")
    res.notes.append(
        f"student: accuracy from the eval reports on split {st.get('split')!r} (n = {st.get('n')})"
        f": student {st.get('source')}, teacher {te.get('source')}"
    )


# ---------------------------------------------------------------------------- the scenario


def run_student(ws: Workspace, opts: StudentOptions) -> ScenarioResult:
    """The ``student`` scenario (see the module docstring); ``ws`` holds the paper's ensemble.
    ``opts`` were checked when the suite was read (:class:`StudentOptions`)."""
    targets = opts.all_targets()
    res = ScenarioResult("student")
    models = _Models(ws, opts, res.notes)
    scfg = models.student_cfg
    size = ws.cfg.image_size
    paper = " + ".join(ws.cfg.members)
    res.notes.append(
        f"student: {_describe(scfg)} ({models.student.name}); teacher: "
        + (_describe(models.teacher_cfg) if models.teacher_cfg else "none")
        + f"; paper ensemble: {paper} ({ws.cfg.member_head} heads, 2 passes, {size} px, "
        f"{ws.cfg.num_classes} classes), random initialisation"
    )

    _accuracy_rows(res, ws, opts, targets)

    # The student as it runs, exported with the step's checks (maps vs grad-cam included).
    sws = _CheckpointWorkspace(
        SuiteConfig(
            name="student",
            members=scfg.members,
            member_head=scfg.member_head,
            num_classes=scfg.num_classes,
            image_size=scfg.image_size,
            threads=ws.cfg.threads,
            seed=ws.cfg.seed,
        ),
        models.root / "run",
        models.student,
    )
    student_art = sws.fused
    flops_s = _flops(student_art)
    flops_label = "FLOPs per frame student / teacher (each as it runs)"
    if models.teacher is not None:
        teacher_art = _export(models.teacher, models.root / "teacher", "teacher")
        flops_t = _flops(teacher_art)
        r = flops_s / flops_t
        _verdict(
            res, flops_label, r, targets["flops_vs_teacher"],
            f"{r:.4f} ({flops_s / 1e9:.3f} / {flops_t / 1e9:.3f} GFLOPs)", plot=True,
        )  # fmt: skip
    else:
        _verdict(res, flops_label, None, targets["flops_vs_teacher"], "not measured")

    # Cost against the paper's ensemble, both at the suite's size.
    student_sized = (
        student_art
        if scfg.image_size == size
        else _export(models.student_at(size), models.root / f"s{size}", "student")
    )
    flops_p = _flops(ws.fused)
    flops_s2 = _flops(student_sized)
    r = flops_s2 / flops_p
    _verdict(
        res, f"FLOPs per frame student / paper ensemble ({size} px)", r,
        targets["flops_vs_paper"],
        f"{r:.4f} ({flops_s2 / 1e9:.3f} / {flops_p / 1e9:.3f} GFLOPs)", plot=True,
    )  # fmt: skip
    _latency_rows(res, ws, student_sized, opts, targets)
    _maps_rows(res, sws, targets)
    _roofline_row(res, student_art, opts, targets)
    if opts.pipelined is not None:
        _pipelined_rows(res, sws, opts)
    res.notes.append(
        "student: FLOPs of the exported graphs (fundus_edge.perf.roofline conventions: 2 x MACs "
        "for Conv/Gemm/MatMul, element-wise ops counted): one frame in, every pass, the maps "
        "and the attention out"
    )
    return res


def _latency_rows(
    res: ScenarioResult,
    ws: Workspace,
    student: Artifact,
    opts: StudentOptions,
    targets: Mapping[str, str],
) -> None:
    """INT8 (and FP32) batch-1 latency of student and paper ensemble, ONNX Runtime CPU,
    interleaved; the INT8 graphs from the export step ``OnnxToInt8`` on the same images."""
    from fundus_edge.convert.calibration import SYNTHETIC_NOTE, ImageSet

    n_cal = opts.calib_images
    calib = ws.images(max(n_cal, 4))
    paper_int8 = ws.int8(n_cal)
    ctx = StepContext(
        out=student.path.parent,
        verify=False,
        calib_set=ImageSet(calib[:n_cal], None, SYNTHETIC_NOTE),
    )
    student_int8 = OnnxToInt8("student", "minmax", "cpu", n_cal).run(student, ctx).artifact.path
    paths = {
        "paper fp32": ws.fused_onnx,
        "student fp32": student.path,
        "paper int8": paper_int8,
        "student int8": student_int8,
    }
    backends = {k: ws.ort(p) for k, p in paths.items()}
    img = ws.images(1)
    try:
        s = interleave(
            {k: (lambda b=b: b.infer(img)) for k, b in backends.items()},
            opts.rounds,
            opts.iters,
            opts.warmup,
        )
    finally:
        for b in backends.values():
            b.close()
    size = ws.cfg.image_size
    rows = {
        k: res.row(
            f"{'paper ensemble' if k.startswith('paper') else 'student'} {k.split()[1]} "
            f"({size} px)",
            "onnxruntime-cpu",
            s[k],
            precision=k.split()[1],
            size_mb=round(paths[k].stat().st_size / 1e6, 2),
        )
        for k in paths
    }
    res.compare(rows["paper fp32"], rows["student fp32"], "FP32 latency student / paper ensemble",
                invert=True)  # fmt: skip
    res.compare(
        rows["paper int8"], rows["student int8"],
        "INT8 latency student / paper ensemble (ORT CPU, batch 1)",
        targets["int8_latency_vs_paper"], invert=True,
    )  # fmt: skip
    for t in res.targets[-2:]:
        t["display"] = f"{t['value']:.4f}"
        t["plot"] = True
    res.notes.append(
        f"student: INT8 = the export step's CPU Q/DQ graphs (minmax calibration on {n_cal} "
        "generated synthetic images; latency does not depend on calibration data)"
    )


def _maps_rows(res: ScenarioResult, sws: _CheckpointWorkspace, targets: Mapping[str, str]) -> None:
    gc = sws.checks.get("cams_vs_gradcam")
    if gc is None:  # the step skips it only without grad-cam, which the suite requires
        raise UserError("student scenario: the export step did not check the maps vs grad-cam")
    n = gc["maps_compared"]
    _verdict(
        res, "student maps vs grad-cam on the student: max abs diff", gc["max_abs"],
        targets["maps_max_abs"], f"{gc['max_abs']:.2e} ({n} maps)",
    )  # fmt: skip
    corr = gc["min_correlation"]
    _verdict(
        res, "student maps vs grad-cam on the student: min correlation", corr,
        targets["maps_correlation"],
        "not measured (all maps constant)" if corr is None else f"{corr:.6f} ({n} maps)",
    )  # fmt: skip
    onnx_check = sws.checks.get("onnxruntime_vs_pytorch") or {}
    res.notes.append(
        f"student: maps = the exported graph's (ONNX Runtime) cams vs the grad-cam package's "
        f"GradCAM on the student in PyTorch, per class, on {len(sws.images(4))} generated "
        f"images, after the package's normalisation (the export step's cams_vs_gradcam check); "
        f"{gc['constant_maps']} constant maps not correlated; ONNX Runtime vs PyTorch probs "
        f"max |d| {onnx_check.get('probs_max_abs', float('nan')):.2e}"
    )


def _roofline_row(
    res: ScenarioResult, student: Artifact, opts: StudentOptions, targets: Mapping[str, str]
) -> None:
    from fundus_edge.perf.roofline import JETSON_PEAKS, roofline

    key = opts.roofline_device
    if key not in JETSON_PEAKS:
        raise UserError(
            f"student scenario: roofline_device {key!r} (known: {', '.join(JETSON_PEAKS)})"
        )
    rf = roofline(
        student.path,
        batch=1,
        input_size=int(student.meta["input_size"]),
        peaks={key: JETSON_PEAKS[key]},
        precisions=("int8",),
    )
    est = rf["estimates"][0]
    fps = float(est["throughput"])
    _verdict(
        res, f"ESTIMATE: {est['device_name']} INT8 roofline FPS, student's whole graph",
        fps, targets["orin_nano_fps"],
        f"est. {fps:.0f} FPS ({est['latency_ms']:.3f} ms)",
    )  # fmt: skip
    uncounted = ", ".join(f"{k} x{v}" for k, v in sorted(rf["uncounted_ops"].items())) or "none"
    res.notes.append(
        f"student: the {est['device_name']} row is a roofline ESTIMATE, not a measurement: a "
        f"lower bound on latency (an upper bound on FPS) from datasheet peaks "
        f"({est['peak_tops']:.1f} dense INT8 TOPS, {est['bandwidth_gbs']:.0f} GB/s), "
        f"{rf['flops'] / 1e9:.3f} GFLOPs and {rf['bytes']['int8'] / 1e6:.1f} MB moved per frame "
        f"at {student.meta['input_size']} px (uint8 frame in, normalisation, every pass, maps, "
        f"attention; decoding and FOV cropping on the CPU are not in it); ops without a FLOP "
        f"count: {uncounted}"
    )


def _pipelined_rows(res: ScenarioResult, sws: _CheckpointWorkspace, opts: StudentOptions) -> None:
    """The suite's ``pipelined`` scenario on the student's graph; its rows, ratios and targets
    join this scenario's, named as the student's."""
    sub = scenario_pipelined(sws, opts.pipelined_options())
    for r in sub.rows:
        r.name = f"student {r.name}"
        res.rows.append(r)
    res.ratios += sub.ratios
    for t in sub.targets:
        res.targets.append({**t, "scenario": res.name, "ratio": f"student, {t['ratio']}"})
    # Without a ``model`` option the pipelined scenario runs its workspace's graph, which here
    # is the student's: say so rather than "the suite's model".
    res.notes += [
        f"student {n}".replace("the suite's model", "the student's graph") for n in sub.notes
    ]
