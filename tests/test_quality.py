"""The image-quality gate (fundus_edge.quality)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fundus_edge.errors import UserError
from fundus_edge.preprocess import Circle, find_fov
from fundus_edge.quality import REASONS, Quality, QualityConfig, assess_quality

pytest.importorskip("hypothesis", reason="hypothesis is not installed")
skdata = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return skdata.retina()


@pytest.fixture(scope="module")
def circle(retina) -> Circle:
    return find_fov(retina)


def _check(q: Quality) -> None:
    assert 0.0 <= q.score <= 1.0
    assert q.passed == (q.reason == "ok")
    assert q.reason == "ok" or q.reason in REASONS
    # Each check scores 0.5 at its threshold, so the score agrees with the verdict.
    assert (q.score >= 0.5) == q.passed or abs(q.score - 0.5) < 1e-6


def test_sharp_retina_passes(retina, circle):
    q = assess_quality(retina, circle)
    _check(q)
    assert q.passed and q.reason == "ok" and q.fov_found
    assert q.score > 0.8
    assert q.underexposed < 0.05 and q.overexposed < 0.05


def test_sharpness_is_resolution_free(retina, circle):
    q = assess_quality(retina, circle)
    small = cv2.resize(retina, (600, 600), interpolation=cv2.INTER_AREA)
    q_small = assess_quality(small, find_fov(small))
    assert q_small.passed
    assert abs(q_small.sharpness - q.sharpness) / q.sharpness < 0.25


@pytest.mark.parametrize("sigma", [6.0, 12.0])
def test_blurred_retina_fails_as_blurry(retina, circle, sigma):
    blurred = cv2.GaussianBlur(retina, (0, 0), sigma)
    q = assess_quality(blurred, find_fov(blurred))
    _check(q)
    assert not q.passed and q.reason == "blurry"
    assert q.sharpness < assess_quality(retina, circle).sharpness / 2


def test_mild_blur_scores_lower_but_passes(retina, circle):
    q0 = assess_quality(retina, circle)
    q1 = assess_quality(cv2.GaussianBlur(retina, (0, 0), 1.5), circle)
    assert q1.passed and q1.sharpness < q0.sharpness


@pytest.mark.parametrize("gain", [0.08, 0.03])
def test_very_dark_retina_fails_as_underexposed(retina, circle, gain):
    dark = (retina * gain).astype(np.uint8)
    q = assess_quality(dark, find_fov(dark))
    _check(q)
    assert not q.passed and q.reason == "underexposed"
    assert q.underexposed > 0.9


def test_dim_but_usable_retina_passes(retina, circle):
    dim = (retina * 0.5).astype(np.uint8)
    q = assess_quality(dim, find_fov(dim))
    assert q.passed, q


@pytest.mark.parametrize("kind", ["gain", "offset"])
def test_overexposed_retina_fails_as_overexposed(retina, kind):
    f = retina.astype(np.float32)
    over = f * 4.0 if kind == "gain" else f + 190.0
    over = np.clip(over, 0, 255).astype(np.uint8)
    q = assess_quality(over, find_fov(over))
    _check(q)
    assert not q.passed and q.reason == "overexposed"
    assert q.overexposed > 0.5


def test_missing_fov_fails_unless_not_required():
    crop = cv2.resize(skdata.microaneurysms(), (400, 400), interpolation=cv2.INTER_CUBIC)
    c = find_fov(crop)
    assert not c.found
    q = assess_quality(crop, c)
    _check(q)
    assert not q.passed and q.reason == "no_fov" and not q.fov_found
    q2 = assess_quality(crop, c, QualityConfig(require_fov=False))
    assert q2.reason != "no_fov"


def test_black_image_is_underexposed():
    img = np.zeros((200, 300, 3), np.uint8)
    q = assess_quality(img, find_fov(img))
    assert q.reason == "underexposed" and q.underexposed == 1.0


def test_padding_of_cut_off_circle_is_not_counted_dark(retina, circle):
    cut = retina[260:1160]  # the circle leaves the frame at top and bottom
    q = assess_quality(cut, find_fov(cut))
    assert q.passed and q.underexposed < 0.05


def test_config_round_trip_and_errors():
    cfg = QualityConfig(min_sharpness=0.05, max_underexposed=0.3)
    assert QualityConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="'min_sharp'"):
        QualityConfig.from_dict({"min_sharp": 0.1})
    with pytest.raises(UserError, match="'max_overexposed'"):
        QualityConfig(max_overexposed=0.0)
    with pytest.raises(UserError, match="'dark_level'"):
        QualityConfig(dark_level=240.0, bright_level=200.0)


def test_threshold_moves_the_verdict(retina, circle):
    q = assess_quality(retina, circle)
    strict = QualityConfig(min_sharpness=q.sharpness * 1.5)
    assert assess_quality(retina, circle, strict).reason == "blurry"


@st.composite
def image_and_circle(draw):
    h, w = draw(st.integers(1, 250)), draw(st.integers(1, 250))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    shape = (h, w) if channels is None else (h, w, channels)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        img = np.full(shape, draw(st.integers(0, 255)), np.uint8)
    if draw(st.booleans()):
        return img, find_fov(img)
    # Arbitrary circles, including ones far outside the frame or tiny.
    c = Circle(
        draw(st.floats(-2 * w, 3 * w)),
        draw(st.floats(-2 * h, 3 * h)),
        draw(st.floats(0.01, 3 * max(h, w))),
        draw(st.booleans()),
    )
    return img, c


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ic=image_and_circle(), size=st.sampled_from([32, 128]))
def test_never_crashes(ic, size):
    img, c = ic
    q = assess_quality(img, c, QualityConfig(analysis_size=size))
    _check(q)
    assert np.isfinite([q.sharpness, q.underexposed, q.overexposed]).all()
    assert 0 <= q.underexposed <= 1 and 0 <= q.overexposed <= 1
