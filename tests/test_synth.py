"""The synthetic fundus generator: determinism, RFMiD layout, masks, visible lesions, the lesion
registry and its drawing order, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from fundus_edge.errors import UserError
from fundus_edge.synth import (
    DEFAULT_PREVALENCE,
    GLOBAL_LABELS,
    LABELS,
    LESIONS,
    SPLIT_LAYOUT,
    SynthConfig,
    generate_dataset,
    generate_image,
    image_rng,
    parse_splits,
    register_lesion,
    sample_labels,
)
from fundus_edge.synth.registry import STAGES, stage_lesions

N, SIZE, SEED = 12, 128, 3
# Scale 3 so that a dozen images still carry most labels.
DS_KW = {"n": N, "size": SIZE, "seed": SEED, "prevalence_scale": 3.0, "show_progress": False}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = generate_dataset(out, **DS_KW)
    return out, summary


def _fov_dist(meta: dict, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.hypot(xx - meta["fov"]["cx"], yy - meta["fov"]["cy"])


def _read(path: Path, flags=cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return img


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_bytes(ds, tmp_path):
    out, _ = ds
    generate_dataset(tmp_path / "b", **DS_KW)
    a, b = _digests(out), _digests(tmp_path / "b")
    assert len(a) > 3 * N  # images, records and masks
    assert a == b


def test_workers_do_not_change_bytes(ds, tmp_path):
    out, _ = ds
    generate_dataset(tmp_path / "w2", workers=2, **DS_KW)
    assert _digests(out) == _digests(tmp_path / "w2")


def test_different_seed_different_images(ds, tmp_path):
    out, _ = ds
    generate_dataset(tmp_path / "s", **{**DS_KW, "seed": SEED + 1})
    a, b = _digests(out), _digests(tmp_path / "s")
    imgs = [k for k in a if k.startswith("Training_Set/Training/")]
    assert imgs and all(a[k] != b.get(k) for k in imgs)


def test_image_rng_depends_on_seed_split_index():
    draws = {
        (s, sp, i): image_rng(s, sp, i).random()
        for s in (0, 1)
        for sp in ("train", "test")
        for i in (1, 2)
    }
    assert len(set(draws.values())) == len(draws)
    assert image_rng(0, "train", 1).random() == draws[(0, "train", 1)]


# ---------------------------------------------------------------------------------------------
# Layout, CSVs, records, masks


def test_layout_and_csvs(ds):
    out, summary = ds
    header = ["ID", "Disease_Risk", *LABELS]
    assert header == [
        "ID",
        "Disease_Risk",
        "DR",
        "ARMD",
        "MH",
        "DN",
        "MYA",
        "BRVO",
        "TSLN",
        "LS",
        "CSR",
        "ODC",
        "CRVO",
        "ODE",
    ]
    total = 0
    for split, (set_dir, img_dir, csv_name) in SPLIT_LAYOUT.items():
        with open(out / set_dir / csv_name, newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == header
        ids = [int(r[0]) for r in rows[1:]]
        assert ids == list(range(1, len(ids) + 1))  # RFMiD: IDs from 1 per split
        assert summary["splits"][split]["count"] == len(ids)
        total += len(ids)
        for r in rows[1:]:
            iid, risk, *labs = (int(v) for v in r)
            assert risk == int(any(labs))
            meta = json.loads((out / set_dir / "Meta" / f"{iid}.json").read_text())
            assert meta["labels"] == [k for k, v in zip(LABELS, labs, strict=True) if v]
            assert meta["disease_risk"] == risk and meta["split"] == split
            img = _read(out / set_dir / img_dir / f"{iid}.png")
            assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
            masks = sorted(p.name for p in (out / set_dir / "Masks").glob(f"{iid}_*.png"))
            assert masks == sorted(f"{iid}_{k}.png" for k in meta["labels"])
            assert set(meta["masks"]) == set(meta["labels"])
    assert total == N
    assert [summary["splits"][k]["count"] for k in SPLIT_LAYOUT] == [7, 3, 2]
    on_disk = json.loads((out / "synth.json").read_text())
    assert on_disk["labels"] == header[1:] and on_disk["n"] == N
    assert on_disk["config"]["seed"] == SEED
    assert "elapsed_s" not in on_disk  # timings would break byte-identical output


def test_masks_binary_nonempty_inside_fov(ds):
    out, _ = ds
    seen = set()
    for meta_path in out.rglob("Meta/*.json"):
        meta = json.loads(meta_path.read_text())
        d = _fov_dist(meta, SIZE)
        for label, rel in meta["masks"].items():
            m = _read(out / rel)
            assert m.shape == (SIZE, SIZE) and m.dtype == np.uint8
            assert set(np.unique(m).tolist()) <= {0, 255}
            assert (m > 0).any(), rel
            assert not (m[d > meta["fov"]["r"] + 1] > 0).any(), rel
            seen.add(label)
    assert len(seen) >= 6  # the scaled prevalence makes most labels appear


def test_image_black_outside_fov(ds):
    out, _ = ds
    for meta_path in out.rglob("Meta/*.json"):
        meta = json.loads(meta_path.read_text())
        img = _read(out / meta["image"])
        d = _fov_dist(meta, SIZE)
        outside, inside = img[d > meta["fov"]["r"] + 3], img[d < 0.8 * meta["fov"]["r"]]
        assert outside.mean() < 3 and outside.max() < 60  # JPEG ringing only
        assert inside[:, 2].mean() > inside[:, 1].mean() > inside[:, 0].mean()  # BGR: R > G > B


# ---------------------------------------------------------------------------------------------
# Images and lesions


@pytest.mark.parametrize("label", LABELS)
def test_each_label_alone(label):
    img, masks, meta = generate_image(np.random.default_rng(11), 160, {label})
    assert img.shape == (160, 160, 3) and img.dtype == np.uint8
    assert set(masks) == {label} and meta["labels"] == [label] and meta["disease_risk"] == 1
    m = masks[label]
    assert m.shape == (160, 160) and m.dtype == np.uint8 and m.any()
    assert not m[_fov_dist(meta, 160) > meta["fov"]["r"] + 1].any()


def test_healthy_has_no_masks():
    _, masks, meta = generate_image(np.random.default_rng(0), 128, set())
    assert masks == {} and meta["disease_risk"] == 0 and meta["lesions"] == []
    assert 0.15 * meta["fov"]["r"] > 0  # geometry is present
    assert meta["eye"] in ("left", "right")


def _disk_vs_ring(img: np.ndarray, recs: list[dict], ch: int) -> tuple[float, float]:
    """Mean of channel ``ch`` inside the lesion disks vs in rings 2-3.5 r around them."""
    size = img.shape[0]
    inner, ring = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    for r in recs:
        c = (round(r["x"]), round(r["y"]))
        cv2.circle(ring, c, max(2, round(3.5 * r["r"])), 1, -1)
    for r in recs:
        c = (round(r["x"]), round(r["y"]))
        cv2.circle(ring, c, max(1, round(2 * r["r"])), 0, -1)
        cv2.circle(inner, c, max(1, round(0.6 * r["r"])), 1, -1)
    ring &= 1 - inner
    x = img[..., ch].astype(np.float64)
    return float(x[inner > 0].mean()), float(x[ring > 0].mean())


def test_dr_haemorrhages_darker_exudates_brighter():
    dark, bright = [], []
    for seed in range(4):
        img, _, meta = generate_image(np.random.default_rng(seed), 256, {"DR"})
        haem = [r for r in meta["lesions"] if r["kind"] == "blot_haemorrhage"]
        ex = [r for r in meta["lesions"] if r["kind"] == "hard_exudate"]
        dark.append(_disk_vs_ring(img, haem, 1))  # green: haemorrhages absorb it
        if ex:
            bright.append(_disk_vs_ring(img, ex, 1))
    inside, around = np.mean(dark, 0)
    assert inside < around - 10, dark
    assert bright, "no exudates drawn in 4 DR images"
    inside, around = np.mean(bright, 0)
    assert inside > around + 10, bright


def test_drusen_brighter_than_surroundings():
    for label in ("ARMD", "DN"):
        img, masks, _ = generate_image(np.random.default_rng(5), 256, {label})
        m = masks[label] > 0
        ring = cv2.dilate(masks[label], np.ones((9, 9), np.uint8)) > 0
        ring &= ~m
        lum = img.astype(np.float64).sum(2)
        assert lum[m].mean() > lum[ring].mean() + 20, label


def test_haze_blurs_and_odc_enlarges_cup():
    # The same generator state up to the haze: the scene is identical, only the haze differs.
    clear, _, _ = generate_image(np.random.default_rng(7), 256, set())
    hazy, masks, meta = generate_image(np.random.default_rng(7), 256, {"MH"})

    def sharp(img):
        return cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F)[
            64:192, 64:192
        ].var()

    assert sharp(hazy) < 0.5 * sharp(clear)
    assert (masks["MH"] > 0).sum() > 0.5 * np.pi * meta["fov"]["r"] ** 2  # the whole FOV
    _, _, odc = generate_image(np.random.default_rng(7), 256, {"ODC"})
    assert odc["disc"]["cup_to_disc"] >= 0.65 > 0.45 >= meta["disc"]["cup_to_disc"]


def test_crvo_bleeds_in_all_quadrants():
    _, _, meta = generate_image(np.random.default_rng(2), 256, {"CRVO"})
    dx, dy = meta["disc"]["cx"], meta["disc"]["cy"]
    quads = {
        (r["x"] > dx, r["y"] > dy) for r in meta["lesions"] if r["kind"] == "flame_haemorrhage"
    }
    assert len(quads) == 4


# ---------------------------------------------------------------------------------------------
# The lesion registry and the drawing order

#: (stage, label) in drawing order, which is the order the image's generator is used in: moving
#: a lesion changes the bytes of every image with it (and the pins below).
DRAW_ORDER = [
    ("choroid", "TSLN"),
    ("choroid", "MYA"),
    ("disc", "ODC"),
    ("retina", "ODE"),
    ("retina", "DN"),
    ("retina", "ARMD"),
    ("retina", "CSR"),
    ("retina", "DR"),
    ("retina", "BRVO"),
    ("retina", "CRVO"),
    ("retina", "LS"),
    ("media", "MH"),
]


def test_lesions_registered_in_drawing_order():
    assert [(s.stage, s.label) for st in STAGES for s in stage_lesions(st, LABELS)] == DRAW_ORDER
    assert set(LESIONS) == set(LABELS)
    assert sorted(GLOBAL_LABELS) == ["MH"]
    assert {k: LESIONS[k].prevalence for k in LABELS} == DEFAULT_PREVALENCE
    assert list(DEFAULT_PREVALENCE) == list(LABELS)
    assert stage_lesions("retina", {"LS", "DR", "MH"}) == [LESIONS["DR"], LESIONS["LS"]]


def test_generate_image_calls_the_registered_drawers_in_order(monkeypatch):
    calls = []
    for label, spec in list(LESIONS.items()):

        def spy(cv, _draw=spec.draw, _label=label):
            calls.append(_label)
            return _draw(cv)

        monkeypatch.setitem(LESIONS, label, dataclasses.replace(spec, draw=spy))
    _, masks, _ = generate_image(np.random.default_rng(1), 96, set(LABELS))
    assert calls == [label for _, label in DRAW_ORDER]
    assert set(masks) == set(LABELS)
    calls.clear()
    generate_image(np.random.default_rng(1), 96, {"LS", "TSLN"})
    assert calls == ["TSLN", "LS"]


def test_register_lesion_checks_its_entry():
    def draw(cv):
        return np.zeros((cv.scene.size, cv.scene.size), np.uint8)

    bad = [
        ({"label": "XX", "stage": "retina", "order": 99, "prevalence": 0.1}, "not an RFMiD"),
        ({"label": "Disease_Risk", "stage": "retina", "order": 99, "prevalence": 0.1}, "RFMiD"),
        ({"label": "DR", "stage": "retina", "order": 99, "prevalence": 0.1}, "already"),
        ({"label": "ERM", "stage": "lens", "order": 99, "prevalence": 0.1}, "unknown stage"),
        ({"label": "ERM", "stage": "retina", "order": 50, "prevalence": 0.1}, "DR's"),
        ({"label": "ERM", "stage": "retina", "order": 99, "prevalence": 1.5}, "prevalence"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            register_lesion(**kwargs)(draw)
    assert "ERM" not in LESIONS
    try:
        assert register_lesion("ERM", "retina", 85, 0.05)(draw) is draw
        assert [s.label for s in stage_lesions("retina", {"ERM", "LS", "DR"})] == [
            "DR",
            "LS",
            "ERM",
        ]
    finally:
        LESIONS.pop("ERM", None)


#: Made with the generator before it became a package (one module with a per-label if-chain;
#: the data sets it wrote are byte-identical to today's): for an image, the sha256 of its meta
#: (every lesion record, in drawing order: numpy arithmetic only, so independent of the OpenCV
#: build) and the generator's state after it (how many numbers it drew). Drawing a lesion at
#: another point, or one number more or fewer, changes them.
PINNED = {
    (21, 128, "DR+ARMD+MH+DN+MYA+BRVO+TSLN+LS+CSR+ODC+CRVO+ODE"): (
        "1c26ef16ee6b5fb8cc128bb93e87b0d5726727581c1ad6e134b0a870b150b8a2",
        90494505652240692137985521076343386055,
    ),
    (22, 160, "MYA"): (
        "198e343db63609d81f47cbec3319739d72add7c26f15ea63a42b2403f586ee21",
        101507890772212489490919206302436172619,
    ),
    (23, 160, "MYA+TSLN"): (
        "40fbae9561c41c80ab97dda0689596ba0afdb93fb1860a49e753e40cad95e82c",
        11581340019372294780566084229161332715,
    ),
    (24, 128, "BRVO+CRVO+ODC+ODE"): (
        "6fe16ad28267e38e05a97486c06f20cb1514e44f64ac5bff89c9656c7abb179c",
        208202885980381350568154897784042493776,
    ),
    (25, 96, ""): (
        "b970367a26c40cb2bbd6481218bb1ad1c0e4d6760217642b78cb20652886e252",
        306018803627635602795930112119608491095,
    ),
    (26, 400, "CSR+DR+LS+MH"): (
        "c4ad535f72dbfc8f78e181f88d4113dc691684f46bc5e010d5e6f2dfb62a8f60",
        222595747085733767062376294087279256877,
    ),
    (27, 128, "ARMD+DN"): (
        "0e2c7b95e7443227d57d4b039ae9b97ebd80b9907c1e67eabb4a54e2c93f88eb",
        161330670827867129542450030447406987042,
    ),
}


@pytest.mark.parametrize("seed, size, labels", list(PINNED))
def test_draws_match_the_pinned_generator(seed, size, labels):
    rng = np.random.default_rng(seed)
    _, _, meta = generate_image(rng, size, set(labels.split("+")) - {""})
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    assert (digest, rng.bit_generator.state["state"]["state"]) == PINNED[seed, size, labels]


# ---------------------------------------------------------------------------------------------
# Labels and configuration


def test_sample_labels_rates_and_extremes():
    rng = np.random.default_rng(0)
    assert sample_labels(rng, dict.fromkeys(LABELS, 0.0)) == set()
    assert sample_labels(rng, dict.fromkeys(LABELS, 1.0)) == set(LABELS)
    draws = [sample_labels(rng, DEFAULT_PREVALENCE) for _ in range(3000)]
    dr = np.mean(["DR" in d for d in draws])
    assert abs(dr - DEFAULT_PREVALENCE["DR"]) < 0.03
    assert np.mean(["CRVO" in d for d in draws]) > 0.015
    risk = np.mean([bool(d) for d in draws])
    assert 0.5 < risk < 0.8  # most eyes sick, as in RFMiD's training set


def test_config_validation():
    assert all(p == 1.0 for p in SynthConfig(prevalence_scale=100).resolved_prevalence().values())
    assert SynthConfig(prevalence={"DR": 0.5}).resolved_prevalence()["DR"] == 0.5
    for bad in (
        SynthConfig(prevalence={"XX": 0.1}),
        SynthConfig(prevalence={"DR": 1.5}),
        SynthConfig(size=16),
        SynthConfig(seed=-1),
        SynthConfig(prevalence_scale=-1),
        SynthConfig(splits=(0.5, 0.2, 0.2)),
    ):
        with pytest.raises(UserError):
            bad.validate()
    assert parse_splits("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for text in ("0.5,0.5", "a,b,c", "1.2,-0.1,-0.1"):
        with pytest.raises(UserError, match="--splits"):
            parse_splits(text)


def test_refuses_non_empty_and_overwrite_replaces(tmp_path):
    out = tmp_path / "o"
    generate_dataset(out, n=3, size=96, seed=0, show_progress=False)
    with pytest.raises(UserError, match="not empty"):
        generate_dataset(out, n=3, size=96, seed=0, show_progress=False)
    stale = out / "Training_Set" / "Masks" / "999_DR.png"
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    generate_dataset(out, n=3, size=96, seed=0, overwrite=True, show_progress=False)
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="--n"):
        generate_dataset(tmp_path / "z", n=0)
    with pytest.raises(UserError, match="--workers"):
        generate_dataset(tmp_path / "z", n=1, workers=0)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_synth(tmp_path):
    import fundus_edge.cli.cmd_synth  # noqa: F401  (registers the command)
    from fundus_edge.cli.app import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["synth", str(out), "--n", "5", "--size", "96", "--seed", "4", "--splits", "0.6,0.2,0.2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "wrote 5 images" in res.output
    assert (out / "synth.json").exists()
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert "not empty" in res.output + (res.stderr if res.stderr_bytes is not None else "")
    res = runner.invoke(app, [*args, "--overwrite", "--prevalence-scale", "0", "--workers", "1"])
    assert res.exit_code == 0, res.output
    with open(out / "Training_Set" / "RFMiD_Training_Labels.csv") as fh:
        assert all(r.endswith(",0" * (len(LABELS) + 1)) for r in fh.read().split()[1:])
    res = runner.invoke(app, ["synth", str(tmp_path / "x"), "--splits", "0.5,0.5"])
    assert res.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Speed: measured and reported, never asserted (shared CI machines vary).


def test_speed_report(tmp_path, record_property):
    n = 6
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    generate_dataset(tmp_path / "speed", n=n, size=512, seed=0, show_progress=False)
    cpu, wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
    record_property("synth_512_images_per_cpu_s", n / cpu)
    record_property("synth_512_images_per_wall_s", n / wall)
    print(f"synth 512 px: {n / cpu:.1f} images per CPU-second, {n / wall:.1f} per wall-second")
    assert len(list((tmp_path / "speed").rglob("Meta/*.json"))) == n


def test_frame_filling_and_non_fundus_frames():
    from fundus_edge.synth import NON_FUNDUS_KINDS, frame_filling, non_fundus_frame

    img, _, meta = generate_image(image_rng(0, "train", 0), 256, set())
    ff = frame_filling(img, meta, 0.6)
    assert ff.shape[0] == ff.shape[1] and ff.dtype == np.uint8
    assert ff.max(axis=2).min() > 10  # no black surround anywhere
    assert frame_filling(img, meta, 0.5, (90, 120)).shape == (90, 120, 3)
    with pytest.raises(UserError, match="fraction"):
        frame_filling(img, meta, 0.9)
    for kind in NON_FUNDUS_KINDS:
        f = non_fundus_frame(kind, (50, 70), np.random.default_rng(0))
        assert f.shape == (50, 70, 3) and f.dtype == np.uint8
    with pytest.raises(UserError, match="unknown kind"):
        non_fundus_frame("sky", (10, 10), np.random.default_rng(0))
