"""Parity checks for exported graphs: proven, not assumed.

* ONNX Runtime vs PyTorch on the same images: ``probs`` max |Δ| <= 1e-4, ``logits`` <= 1e-3.
* ``cams`` vs the ``grad-cam`` package's GradCAM on each member, per class, after the
  package's own normalisation (min-max, bilinear resize, min-max): max |Δ| <= 1e-2 and
  correlation >= 0.999 (maps that are constant in both are counted, not correlated).
* ``maps_max_abs``: the combined class maps a user sees (:func:`combined_maps`, i.e.
  :func:`fundus_edge.maps.normalise_member_maps`, the maps ``eval`` and ``run`` use) of the
  two graphs compared (reported).
* Reduced precision vs FP32 ONNX: FP16 ``probs`` within 1e-2 and maps correlating >= 0.99;
  INT8 reports the AUROC change and map correlation (not gated: INT8 accuracy is judged on
  the user's data). Two INT8 graphs quantised from the same FP32 graph on the same images
  (the workstation's and the device's) agree within ``int8_probs`` (5e-2) on ``probs``.
* OpenVINO IR vs the FP32 ONNX (gated): FP32 compute from FP16-stored weights as FP16 above;
  BF16 ``probs`` within ``bf16_probs`` (5e-2), INT8 within ``ov_int8_probs`` (0.1), both with
  maps correlating >= ``low_map_corr`` (0.98).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "TOLERANCES",
    "combined_maps",
    "compare_outputs",
    "gradcam_parity",
    "map_correlation",
    "ort_outputs",
]


@dataclass(frozen=True)
class Tolerances:
    probs: float = 1e-4
    logits: float = 1e-3
    cam_abs: float = 1e-2
    cam_corr: float = 0.999
    fp16_probs: float = 1e-2
    fp16_map_corr: float = 0.99
    int8_probs: float = 5e-2
    bf16_probs: float = 5e-2
    ov_int8_probs: float = 1e-1
    low_map_corr: float = 0.98


TOLERANCES = Tolerances()


def ort_outputs(
    path, images: np.ndarray, providers: list[str] | None = None, batch: int | None = None
) -> dict[str, np.ndarray]:
    """Run an exported graph in ONNX Runtime; a dict keyed by output name.

    Args:
        path: the ``.onnx`` file.
        images: ``(N, S, S, 3)`` uint8, the graph's input.
        providers: ONNX Runtime execution providers (default: the CPU's).
        batch: images per run (bounded memory for large N); all at once when None. One
            session serves every batch (opening one costs ~0.2 s for the demo ensemble).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    step = len(images) if not batch else int(batch)
    parts = [
        sess.run(names, {"image": images[i : i + step]})
        for i in range(0, max(len(images), 1), step)
    ]
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() < 1e-12 or b.std() < 1e-12:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def map_correlation(ref: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Correlation of raw maps (N,M,C,h,w): over all values, and per map (min / median)."""
    per = [
        c
        for c in (
            _corr(ref[i, m, k], test[i, m, k])
            for i in range(ref.shape[0])
            for m in range(ref.shape[1])
            for k in range(ref.shape[2])
        )
        if c is not None
    ]
    overall = _corr(ref, test)
    return {
        "overall": overall,
        "per_map_min": min(per) if per else None,
        "per_map_median": float(np.median(per)) if per else None,
        "maps_compared": len(per),
    }


def combined_maps(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The class maps (N,C,h,w) a graph's raw ``cams`` give: :mod:`fundus_edge.maps`' one
    normalisation (the maps ``eval`` scores and ``run`` draws); None without ``cams``."""
    from fundus_edge.maps import normalise_member_maps

    cams = outputs.get("cams")
    return None if cams is None else normalise_member_maps(np.asarray(cams, dtype=np.float32))


def compare_outputs(ref: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, Any]:
    """Max |Δ| per output, the map correlation and the combined maps' max |Δ|."""
    out: dict[str, Any] = {}
    for k in ("probs", "logits", "cams", "attention"):
        if k in ref and k in test:
            out[f"{k}_max_abs"] = float(np.abs(ref[k].astype(np.float64) - test[k]).max())
    if "cams" in ref and "cams" in test:
        out["cams_correlation"] = map_correlation(ref["cams"], test["cams"])
        if ref["cams"].shape == test["cams"].shape:
            a, b = combined_maps(ref), combined_maps(test)
            out["maps_max_abs"] = float(np.abs(a - b).max())
    if "probs" in ref and "probs" in test:
        out["label_agreement"] = float(((ref["probs"] >= 0.5) == (test["probs"] >= 0.5)).mean())
    return out


def gradcam_parity(
    fused, images: np.ndarray, cams: np.ndarray, classes: list[int] | None = None
) -> dict[str, Any]:
    """Compare exported raw maps with the grad-cam package, per member and class.

    Both sides are normalised the package's way (min-max, resize, min-max), not by
    :mod:`fundus_edge.maps`: this check proves the forward-only kernels exact against the
    package on its own terms; what users see is compared by :func:`combined_maps`.

    A member whose CAM grid differs from the first member's is exported resampled
    (bilinearly) onto that grid; its reference is then the package's map at the member's own
    grid, put through the same resampling, so the check still compares the member's
    native map with the package's.

    Args:
        fused: the :class:`~fundus_edge.models.fused.FusedModel` that was exported.
        images: the uint8 (N,H,W,3) images the maps were computed on.
        cams: the exported graph's ``cams`` output (N,M,C,h,w).
        classes: classes to check (default all).

    Returns:
        Worst max |Δ| and correlation over every (member, class), counts, and the members
        that were compared through the resampling.
    """
    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torch import nn

    from fundus_edge.models.cam import gradcam_normalise

    ens = fused.ensemble.eval()
    x = fused.normalise(torch.from_numpy(images))
    size = tuple(x.shape[-2:])
    grid = tuple(cams.shape[-2:])

    class _FusedLogits(nn.Module):  # grad-cam's view of a fusion head: x -> fused logits
        def __init__(self, e: nn.Module) -> None:
            super().__init__()
            self.e = e

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.e.head_logits(t)[:, 0]

    class _NativeGradCAM(GradCAM):  # the package's maps left at the layer's own grid
        def __init__(self, *args, native: tuple[int, int], **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.native = native

        def get_target_width_height(self, input_tensor):
            return self.native[1], self.native[0]

    n_classes = cams.shape[2]
    classes = list(range(n_classes)) if classes is None else classes
    worst_abs, worst_corr, compared, constant = 0.0, 1.0, 0, 0
    resampled = []
    ours_all = gradcam_normalise(torch.from_numpy(cams).flatten(0, 1), size)  # (N*M,C,H,W)
    ours_all = ours_all.view(cams.shape[0], cams.shape[1], n_classes, *size).numpy()
    for mi, member in enumerate(ens.members):
        model = _FusedLogits(ens) if ens.fusion is not None else member
        with torch.no_grad():
            native = tuple(member.forward_features(x[:1]).shape[-2:])
        if native == grid:
            cam_obj = GradCAM(model=model, target_layers=[member.target_layer])
        else:
            resampled.append(member.name)
            cam_obj = _NativeGradCAM(
                model=model, target_layers=[member.target_layer], native=native
            )
        with cam_obj as cam:
            for c in classes:
                ref = cam(
                    input_tensor=x, targets=[ClassifierOutputTarget(c) for _ in range(len(x))]
                )
                if native != grid:
                    t = F.interpolate(
                        torch.from_numpy(ref)[:, None], size=grid, mode="bilinear",
                        align_corners=False,
                    )  # fmt: skip
                    ref = gradcam_normalise(t[:, 0], size).numpy()
                ours = ours_all[:, mi, c]
                worst_abs = max(worst_abs, float(np.abs(ref - ours).max()))
                for i in range(len(ref)):
                    corr = _corr(ref[i], ours[i])
                    if corr is None:
                        constant += 1
                    else:
                        compared += 1
                        worst_corr = min(worst_corr, corr)
    return {
        "max_abs": worst_abs,
        "min_correlation": worst_corr if compared else None,
        "maps_compared": compared,
        "constant_maps": constant,
        "members": [m.name for m in ens.members],
        "resampled_members": resampled,
        "classes": classes,
    }
