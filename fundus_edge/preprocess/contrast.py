"""Contrast normalisation of the model input: CLAHE and Graham's local-mean subtraction."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["clahe", "local_mean"]


def local_mean(img: np.ndarray, fov: np.ndarray, sigma: float) -> np.ndarray:
    """Graham's ``4·img − 4·gauss(img) + 128`` with the Gaussian averaged inside ``fov`` only.

    Normalised convolution (blur of masked image / blur of mask) keeps the black outside the
    field of view from darkening the local mean near the rim, which otherwise leaves a bright
    ring there.
    """
    f = img.astype(np.float32)
    m = fov.astype(np.float32)
    num = cv2.GaussianBlur(f * m[:, :, None], (0, 0), sigma)
    den = cv2.GaussianBlur(m, (0, 0), sigma)
    mean = num / np.maximum(den, 1e-3)[:, :, None]
    out = 4.0 * f - 4.0 * mean + 128.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def clahe(img: np.ndarray, clip: float, grid: int) -> np.ndarray:
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid))
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
