"""distill: the terms, teacher targets that follow augmentation, unlabelled images, the recipe,
and (tiny, end to end) a distilled student that trains, records its teacher and exports."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")
pytest.importorskip("safetensors", reason="safetensors is not installed (extra: train)")

from _models import settle_batchnorm  # noqa: E402

from fundus_edge.distill.config import load_distill_config  # noqa: E402
from fundus_edge.distill.data import unlabelled_samples  # noqa: E402
from fundus_edge.distill.losses import (  # noqa: E402
    attention_loss,
    cosine_distance,
    map_loss,
    soft_label_loss,
)
from fundus_edge.distill.targets import augment_maps, soft_labels  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402
from fundus_edge.torchdata import AugmentConfig, augment_image  # noqa: E402

# --------------------------------------------------------------------------------------------
# The terms


def test_soft_label_loss_is_zero_at_the_teacher_and_grows_away_from_it():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 5, generator=g) * 3
    assert float(soft_label_loss(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    near = soft_label_loss(teacher + 0.1, teacher, 2.0)
    far = soft_label_loss(teacher + 2.0, teacher, 2.0)
    assert 0 < float(near) < float(far)
    # (N, M', C) heads are each distilled towards the same (N, C) teacher.
    heads = torch.stack([teacher, teacher + 2.0], dim=1)
    assert float(soft_label_loss(heads, teacher, 2.0)) == pytest.approx(float(far) / 2, rel=1e-5)


def test_soft_label_gradient_points_to_the_teacher_and_weights_drop_images():
    teacher = torch.tensor([[2.0, -1.0]])
    student = torch.zeros(1, 2, requires_grad=True)
    soft_label_loss(student, teacher, 3.0).backward()
    assert student.grad[0, 0] < 0 < student.grad[0, 1]  # up towards 2, down towards -1
    both = torch.cat([teacher, teacher + 5.0])
    stu = torch.cat([teacher, teacher])
    assert float(soft_label_loss(stu, both, 1.0, torch.tensor([1.0, 0.0]))) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(soft_label_loss(stu, both, 1.0, torch.tensor([0.0, 1.0]))) > 0.1


def test_soft_labels_at_a_temperature():
    z = np.array([[0.0, 4.0, -4.0]])
    np.testing.assert_allclose(soft_labels(z, 1.0), 1 / (1 + np.exp(-z)), rtol=1e-6)
    hot = soft_labels(z, 4.0)
    assert hot[0, 0] == pytest.approx(0.5) and 0.5 < hot[0, 1] < soft_labels(z, 1.0)[0, 1]


def test_map_terms_ignore_scale_and_follow_the_teachers_probabilities():
    t = torch.zeros(1, 2, 4, 4)
    t[0, 0, 1, 1] = 1.0  # label 0 looks top left
    t[0, 1, 2, 3] = 1.0  # label 1 looks right
    same = (t * 7.0).unsqueeze(1)  # (N, M=1, C, h, w): the teacher's maps at another scale
    assert float(map_loss(same, t, torch.tensor([[0.9, 0.9]]))) == pytest.approx(0.0, abs=1e-6)
    wrong = same.flip(-1)
    assert float(map_loss(wrong, t, torch.tensor([[0.9, 0.9]]))) == pytest.approx(1.0)
    # Only label 1's map is wrong: the term follows the teacher's belief in label 1.
    mixed = torch.cat([same[:, :, :1], wrong[:, :, 1:]], dim=2)
    low = map_loss(mixed, t, torch.tensor([[0.9, 0.1]]))
    high = map_loss(mixed, t, torch.tensor([[0.1, 0.9]]))
    assert float(low) == pytest.approx(0.1) and float(high) == pytest.approx(0.9)
    # Gradients reach the student's maps.
    s = torch.rand(1, 1, 2, 4, 4, requires_grad=True)
    map_loss(s, t, torch.tensor([[0.5, 0.5]])).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="different grids"):
        map_loss(torch.rand(1, 1, 2, 8, 8), t, torch.tensor([[0.5, 0.5]]))


def test_attention_and_cosine_distance():
    a = torch.rand(3, 1, 5, 5)
    assert float(attention_loss(a * 3, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(torch.zeros(4, 4), torch.rand(4, 4))) == pytest.approx(1.0)
    other = torch.zeros(3, 1, 5, 5)
    other[..., 0, 0] = 1.0
    spread = torch.zeros(3, 1, 5, 5)
    spread[..., 4, 4] = 1.0
    assert float(attention_loss(spread, other)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Teacher targets follow the training augmentation


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_augment_maps_replays_the_datasets_draws(index):
    """A map drawn into the image moves exactly as the image does in the training dataset."""
    size, grid = 64, 8
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate=30.0, brightness=0.0, contrast=0.0)
    m = np.zeros((1, grid, grid), dtype=np.float32)
    m[0, 1:3, 5:7] = 1.0  # an off-centre blob: any flip or rotation moves it
    # The "image" is the map at input size; the dataset draws from (seed, epoch, index).
    from fundus_edge.maps import resample

    img = np.repeat((resample(m, (size, size))[0] * 255).astype(np.uint8)[..., None], 3, axis=2)
    seed, epoch = 7, 3
    moved_img = augment_image(img, aug, np.random.default_rng((seed, epoch, index)))
    want = cv2_area(moved_img[..., 0].astype(np.float32) / 255.0, grid)
    got = augment_maps(m, size, aug, seed, epoch, index)[0]
    np.testing.assert_allclose(got, want, atol=0.02)
    # Another epoch draws differently (here at least one of the four is different).
    others = [augment_maps(m, size, aug, seed, e, index)[0] for e in range(4)]
    assert any(not np.allclose(o, others[0], atol=1e-3) for o in others)


def cv2_area(a: np.ndarray, grid: int) -> np.ndarray:
    import cv2

    return cv2.resize(a, (grid, grid), interpolation=cv2.INTER_AREA)


def test_augment_maps_without_geometry_is_the_identity():
    m = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    aug = AugmentConfig(hflip=0.0, vflip=0.0, rotate=0.0, brightness=0.2, contrast=0.2)
    np.testing.assert_array_equal(augment_maps(m, 32, aug, 0, 0, 0), m)
    np.testing.assert_array_equal(augment_maps(m, 32, None, 0, 0, 0), m)


# --------------------------------------------------------------------------------------------
# Unlabelled images


def test_unlabelled_images_any_format_and_never_the_held_out_ones(tmp_path):
    import shutil

    import cv2

    folder = tmp_path / "extra"
    (folder / "sub").mkdir(parents=True)
    (folder / "Masks").mkdir()
    img = np.full((20, 20, 3), 90, np.uint8)
    cv2.imwrite(str(folder / "a.png"), img)
    cv2.imwrite(str(folder / "sub" / "b.JPG"), img)
    cv2.imwrite(str(folder / "Masks" / "a_DR.png"), img)  # a mask folder is not images
    (folder / "notes.txt").write_text("x")
    held_out = folder / "sub" / "c.png"
    cv2.imwrite(str(held_out), img[:, :, ::-1] // 2)
    labelled = tmp_path / "labelled.png"
    cv2.imwrite(str(labelled), img + 1)
    shutil.copy(labelled, folder / "copy.png")  # a byte-identical copy of a labelled image
    samples = unlabelled_samples(folder, 3, exclude=[held_out, labelled])
    assert sorted(s.id for s in samples) == ["a.png", "sub/b.JPG"]
    assert all(s.labels.shape == (3,) and not s.labels.any() for s in samples)
    assert len(unlabelled_samples(folder, 3, limit=1)) == 1
    with pytest.raises(UserError, match=r"--unlabelled .*no such folder"):
        unlabelled_samples(tmp_path / "missing", 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image found"):
        unlabelled_samples(tmp_path / "empty", 3)


# --------------------------------------------------------------------------------------------
# The recipe


def test_recipe_layers_teacher_defaults_recipe_sets_options(tmp_path, repo_root):
    recipe = tmp_path / "d.yaml"
    recipe.write_text(
        "epochs: 3\nmodel:\n  members: [mobilenet_v3_large]\n"
        "distill:\n  temperature: 3\n  map_weight: 2.0\n"
    )

    def teacher_defaults(path):
        return {"model.image_size": 96, "model.member_head": "gap", "epochs": 9}

    cfg, d = load_distill_config(
        recipe,
        {"distill.teacher": "t.safetensors", "epochs": 5},
        ["distill.temperature=4", "optim.lr=0.01"],
        teacher_defaults,
    )
    assert (cfg.epochs, cfg.model.image_size, cfg.model.member_head) == (5, 96, "gap")
    assert cfg.model.members == ("mobilenet_v3_large",) and cfg.optim.lr == 0.01
    assert (d.teacher, d.temperature, d.map_weight) == ("t.safetensors", 4.0, 2.0)
    # The shipped demo recipe loads.
    cfg, d = load_distill_config(
        repo_root / "training" / "distill-demo.yaml", {"distill.teacher": "t.safetensors"}
    )
    assert len(cfg.model.members) == 1


@pytest.mark.parametrize(
    ("text", "sets", "message"),
    [
        ("distill:\n  temperatur: 2\n", [], r"d\.yaml: unknown key distill\.temperatur \(known: "),
        ("distill:\n  temperature: 0\n", [], r"distill\.temperature: must be > 0"),
        ("distill:\n  map_weight: -1\n", [], r"distill\.map_weight: must be >= 0"),
        ("distill:\n  init: maybe\n", [], r"distill\.init: 'maybe' is not one of"),
        ("modle:\n  members: [x]\n", [], r"d\.yaml: unknown key modle"),
        ("", ["distill.temperature=hot"], r"distill\.temperature: expected a number"),
        (
            "distill:\n  soft_weight: 0\n  map_weight: 0\n  attention_weight: 0\n",
            [],
            "nothing would be learnt",
        ),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text, sets, message):
    recipe = tmp_path / "d.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError, match=message):
        load_distill_config(recipe, {"distill.teacher": "t.safetensors"}, sets)


def test_a_teacher_is_required():
    with pytest.raises(UserError, match=r"distill\.teacher: no teacher"):
        load_distill_config(None, {})


# --------------------------------------------------------------------------------------------
# Targets per batch row, unlabelled rows


def _targets(n: int, c: int = 3, g: int = 4):
    from fundus_edge.distill.targets import TeacherTargets

    rng = np.random.default_rng(0)
    return TeacherTargets(
        logits=rng.normal(size=(n, c)).astype(np.float32),
        maps=rng.random((n, c, g, g)).astype(np.float32),
        attention=rng.random((n, 1, g, g)).astype(np.float32),
        readable=np.ones(n, dtype=bool),
    )


def test_target_source_rows_by_index_and_unlabelled_rows_in_order(tmp_path):
    import cv2

    from fundus_edge.distill.data import TeacherTargetSource
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.torchdata import FundusTorchDataset
    from fundus_edge.trainer import Batch

    folder = tmp_path / "u"
    folder.mkdir()
    for k in range(5):
        cv2.imwrite(str(folder / f"{k}.png"), np.full((40, 40, 3), 40 * k + 20, np.uint8))
    extra = unlabelled_samples(folder, 3)
    still = AugmentConfig(hflip=0.0, vflip=0.0, rotate=0.0, brightness=0.0, contrast=0.0)
    uds = FundusTorchDataset(extra, PreprocessConfig(size=32), (0.5,) * 3, (0.5,) * 3, still, 1)
    uds.preload(1)
    t = _targets(4 + 5)
    src = TeacherTargetSource(t, 4, 32, still, 0, uds, per_step=2)
    more = src.batch(epoch=1, step=3)
    assert len(more) == 2 and not bool(more.labelled.any()) and (more.index == -1).all()
    assert more.x.shape == (2, 3, 32, 32) and not bool(more.y.any())
    again = TeacherTargetSource(t, 4, 32, still, 0, uds, per_step=2).batch(epoch=1, step=3)
    torch.testing.assert_close(more.x, again.x)  # drawn from (epoch, step) alone
    rows = list(src._rows)
    labelled = Batch(x=torch.zeros(2, 3, 32, 32), y=torch.zeros(2, 3), index=torch.tensor([2, 0]))
    both = labelled.cat(more)
    got = src.targets(both)
    want = [2, 0, 4 + rows[0], 4 + rows[1]]
    np.testing.assert_allclose(got["logits"].numpy(), t.logits[want])
    np.testing.assert_allclose(got["maps"].numpy(), t.maps[want])
    np.testing.assert_allclose(got["attention"].numpy(), t.attention[want])
    assert src.targets(both) is got  # computed once per batch
    # Without unlabelled images: no rows added, the epoch is still noted.
    plain = TeacherTargetSource(_targets(4), 4, 32, still, 0)
    assert plain.batch(epoch=2, step=0) is None and plain.epoch == 2
    with pytest.raises(ValueError, match="more unlabelled rows"):
        plain.targets(
            Batch(x=torch.zeros(1, 3, 32, 32), y=torch.zeros(1, 3), index=torch.tensor([-1]))
        )


# --------------------------------------------------------------------------------------------
# End to end on a tiny synthetic set: teacher -> student -> export

SIZE = 64


def _tiny_teacher(path, labels, members=("resnet18", "mobilenet_v3_large")):
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint

    torch.manual_seed(0)
    cfg = EnsembleConfig(
        members=members,
        member_head="gap",
        num_classes=len(labels),
        label_names=tuple(labels),
        image_size=SIZE,
    )
    # Real batch statistics: random-init BN running stats make every map constant.
    return save_checkpoint(path, settle_batchnorm(build_ensemble(cfg), SIZE, batch=8))


@pytest.fixture(scope="module")
def teacher_path(tiny_synth, tmp_path_factory):
    from fundus_edge.data import open_dataset

    labels = open_dataset(tiny_synth).label_names
    return _tiny_teacher(tmp_path_factory.mktemp("teacher") / "best.safetensors", labels)


TINY = [
    "--student", "resnet18", "--epochs", "1", "--batch-size", "4", "--workers", "0",
    "--device", "cpu", "--seed", "1", "--set", "optim.loss.mask_weight=1.0",
]  # fmt: skip


def _invoke(args):
    from typer.testing import CliRunner

    from fundus_edge.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def tiny_distill(tiny_synth, teacher_path):
    """``run(out, *options)``: ``distill`` of a one-epoch ResNet18 student from the tiny
    teacher on the tiny set into ``out`` (the setup every distill run here shares)."""

    def run(out, *options):
        args = ["distill", "--teacher", str(teacher_path), "--data", str(tiny_synth)]
        return _invoke([*args, "--out", str(out), *TINY, *options])

    return run


@pytest.fixture(scope="module")
def student_run(tiny_distill, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    res = tiny_distill(out, "--one-pass")
    assert res.exit_code == 0, res.output
    return out


def test_student_checkpoint_records_its_teacher_and_the_terms(student_run, teacher_path):
    import json

    from fundus_edge.fileio import sha256_file
    from fundus_edge.models import load_checkpoint

    model, meta = load_checkpoint(student_run / "best.safetensors")
    assert list(model.config.members) == ["resnet18"] and model.config.views == "original"
    assert model.config.member_head == "gap" and model.config.image_size == SIZE
    rec = meta["distill"]
    assert rec["teacher"]["sha256"] == sha256_file(teacher_path)
    assert rec["teacher"]["name"].endswith("best.safetensors")
    assert rec["teacher"]["members"] == ["resnet18", "mobilenet_v3_large"]
    assert rec["init"] == "teacher" and rec["passes"] == 1 and rec["unlabelled_images"] == 0
    last = load_checkpoint(student_run / "last.safetensors")[1]
    assert last["distill"] == rec
    epoch = json.loads((student_run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train_soft", "train_maps", "train_attention", "train_mask_loss"):
        assert np.isfinite(epoch[key]), key
    # One pass still gives the whole contract: probabilities, per-label maps, attention.
    out = model(torch.zeros(2, 3, SIZE, SIZE))
    assert out["probs"].shape == (2, model.config.num_classes)
    assert out["cams"].shape[:3] == (2, 1, model.config.num_classes)
    assert out["attention"].shape[:2] == (2, 1)


def test_student_exports_unchanged_with_parity(student_run, tmp_path):
    pytest.importorskip("onnx", reason="export needs onnx")
    pytest.importorskip("pytorch_grad_cam", reason="parity checks need grad-cam")
    import json

    res = _invoke(
        [
            "export",
            "--model",
            str(student_run / "best.safetensors"),
            "--out",
            str(tmp_path / "exp"),
            "--format",
            "onnx",
        ]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "exp" / "export_report.json").read_text())
    assert report["passed"] is True and (tmp_path / "exp" / "model.onnx").is_file()
    checks = report["checks"]
    if "onnxruntime_vs_pytorch" not in checks:  # the checkpoint step's own report
        checks = report["source"]["report"]["checks"]
    assert checks["onnxruntime_vs_pytorch"]["passed"] is True
    assert checks["cams_vs_gradcam"]["passed"] is True  # the student's maps are exact kernels


def test_two_passes_and_unlabelled_images(tiny_synth, tiny_distill, tmp_path):
    import shutil

    import cv2

    from fundus_edge.data import open_dataset
    from fundus_edge.models import load_checkpoint

    ds = open_dataset(tiny_synth)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for s in ds.splits["train"][:3]:  # new images (mirrored, JPEG): they count
        img = cv2.imread(str(s.path))
        cv2.imwrite(str(folder / f"u_{s.path.stem}.jpg"), img[:, ::-1])
    for s in ds.splits["test"][:2]:  # copies of held-out images are never used
        shutil.copy(s.path, folder / f"copy_{s.path.name}")
    out = tmp_path / "run2"
    res = tiny_distill(out, "--two-pass", "--unlabelled", str(folder), "--temperature", "3")
    assert res.exit_code == 0, res.output
    model, meta = load_checkpoint(out / "best.safetensors")
    assert model.config.views == "both"
    rec = meta["distill"]
    assert rec["passes"] == 2 and rec["temperature"] == 3.0
    assert rec["unlabelled_images"] == 3
    res = tiny_distill(
        tmp_path / "run3", "--unlabelled", str(tiny_synth), "--one-pass", "--stop-after", "1"
    )
    assert "no image found (outside the labelled dataset)" in res.output
    assert res.exit_code == 2


def test_refusals_are_one_line_before_any_work(tiny_synth, teacher_path, student_run, tmp_path):
    base = ["distill", "--data", str(tiny_synth), *TINY]
    res = _invoke(
        [*base, "--teacher", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 2 and "--teacher" in res.output and "not found" in res.output
    res = _invoke([*base, "--teacher", str(teacher_path), "--out", str(student_run)])
    assert res.exit_code == 2 and "--resume" in res.output and "--overwrite" in res.output
    # A student member the teacher does not lead with cannot start from the teacher.
    res = _invoke(
        [
            *base,
            "--teacher",
            str(teacher_path),
            "--out",
            str(tmp_path / "b"),
            "--init",
            "teacher",
            "--student",
            "mobilenet_v3_large",
        ]
    )
    assert res.exit_code == 2 and "distill.init teacher" in res.output
    # Labels that are not the teacher's.
    other = _tiny_teacher(tmp_path / "other.safetensors", ["A", "B"], members=("resnet18",))
    res = _invoke([*base, "--teacher", str(other), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "differ from the teacher's" in res.output
    res = _invoke(
        [
            *base,
            "--teacher",
            str(teacher_path),
            "--out",
            str(tmp_path / "d"),
            "--student",
            "resnet18",
            "--set",
            "model.member_head=native",
        ]
    )
    assert res.exit_code == 2 and "pooled per-member heads" in res.output


def test_update_checkpoint_meta_adds_keys_and_keeps_the_contract(tmp_path):
    from safetensors.torch import load_file

    from fundus_edge.models.checkpoint import read_checkpoint_meta, update_checkpoint_meta

    path = _tiny_teacher(tmp_path / "t.safetensors", ["A", "B"], members=("resnet18",))
    before = load_file(str(path))
    update_checkpoint_meta(path, {"distill": {"teacher": {"sha256": "x"}}})
    meta = read_checkpoint_meta(path)
    assert meta["distill"]["teacher"]["sha256"] == "x" and meta["label_names"] == ["A", "B"]
    after = load_file(str(path))
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="'config' is the checkpoint's own"):
        update_checkpoint_meta(path, {"config": {}})
