"""Heads that compute their Grad-CAM maps forward-only (the derivation follows below).

Every head here is "adaptive average pool, flatten, then an MLP" over the CAM target
activations A (N,K,h,w). The gradient of logit z_c with respect to A is then computable
with forward operations only:

* the MLP's backward pass is a chain ``W_L[c] -> (* act'(z_i)) -> @ W_i`` where each
  activation derivative (ReLU mask, Hardswish slope) comes from the forward values;
* the first layer's weight is summed over the pooled cells (``W1pool``); adaptive average
  pooling preserves the spatial *sum* of the gradient at any input size, so
  ``alpha = (g1 @ W1pool) / (h*w)`` is exactly Grad-CAM's spatially averaged gradient;
* ``cam_c = ReLU(sum_k alpha[c,k] A_k)``. With a single linear layer alpha is constant:
  a 1x1 convolution with the head weight.

Dropout is the identity in eval mode, which is where the maps equal ``pytorch_grad_cam``.
In training mode the same formula runs on the training-mode activations (dropout's mask is
not in the chain): the maps are then an attention signal, not an exact gradient.
Maps are from logits, never sigmoid (sigmoid saturates and zeroes the gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FusionHead",
    "PooledHead",
    "gradcam_normalise",
    "minmax",
]

_EPS = 1e-7  # pytorch_grad_cam's epsilon on the max


def minmax(t: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Min-max normalise over the last two dims like ``pytorch_grad_cam``: ``(t-min)/(max+eps)``."""
    t = t - t.amin(dim=(-2, -1), keepdim=True)
    return t / (t.amax(dim=(-2, -1), keepdim=True) + eps)


def gradcam_normalise(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ``pytorch_grad_cam`` display normalisation: minmax, bilinear resize, minmax.

    Args:
        cam: (..., h, w) raw maps (ReLU applied).
        size: (H, W) output size (the input image size).

    Returns:
        (..., H, W) maps in [0, 1]; bilinear with ``align_corners=False`` matches ``cv2.resize``.
    """
    lead = cam.shape[:-2]
    t = minmax(cam).reshape(-1, 1, *cam.shape[-2:])
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return minmax(t).reshape(*lead, *size)


def _activation_slope(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """d act(z) / dz for the elementwise activations torchvision heads use, as autograd does."""
    if isinstance(module, nn.ReLU):
        return (z > 0).to(z.dtype)
    if isinstance(module, nn.Hardswish):
        # autograd: 0 for z < -3, z/3 + 1/2 for -3 <= z <= 3, 1 above.
        mid = z / 3.0 + 0.5
        return torch.where(
            z < -3.0, torch.zeros_like(z), torch.where(z <= 3.0, mid, torch.ones_like(z))
        )
    raise TypeError(f"no forward-only derivative for {type(module).__name__}")


_ACTIVATIONS = (nn.ReLU, nn.Hardswish)
_IDENTITIES = (nn.Dropout, nn.Identity)


def _adaptive_pool_matrix(
    h: int, w: int, p: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(P*P, h*w) matrix M with ``adaptive_avg_pool2d(A, p).flatten(-2) == A.flatten(-2) @ M.T``."""

    def bins(size: int) -> list[tuple[int, int]]:
        # PyTorch's adaptive pooling cell i covers [floor(i*size/p), ceil((i+1)*size/p)).
        return [((i * size) // p, -((-(i + 1) * size) // p)) for i in range(p)]

    m = torch.zeros(p * p, h * w, dtype=dtype, device=device)
    for i, (y0, y1) in enumerate(bins(h)):
        for j, (x0, x1) in enumerate(bins(w)):
            cell = torch.zeros(h, w, dtype=dtype, device=device)
            cell[y0:y1, x0:x1] = 1.0 / ((y1 - y0) * (x1 - x0))
            m[i * p + j] = cell.flatten()
    return m


class PooledHead(nn.Module):
    """Adaptive-average-pool + MLP head with forward-only Grad-CAM.

    Args:
        pool_size: side of the adaptive average pool (1 = global average pooling).
        classifier: ``nn.Sequential`` of ``Linear``, ``ReLU``/``Hardswish`` and ``Dropout``;
            the last module must be the ``Linear`` producing the logits.
    """

    def __init__(self, pool_size: int, classifier: nn.Sequential) -> None:
        super().__init__()
        for mod in classifier:
            if not isinstance(mod, (nn.Linear, *_ACTIVATIONS, *_IDENTITIES)):
                raise TypeError(
                    f"PooledHead cannot differentiate {type(mod).__name__} forward-only"
                )
        first_linear = next(i for i, m in enumerate(classifier) if isinstance(m, nn.Linear))
        if any(isinstance(m, _ACTIVATIONS) for m in classifier[:first_linear]):
            raise TypeError("PooledHead needs a Linear before any activation")
        if not isinstance(classifier[-1], nn.Linear):
            raise TypeError("PooledHead's classifier must end with the logits Linear")
        self.pool_size = int(pool_size)
        self.classifier = classifier

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    def _pool(self, a: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 1:
            return a.mean(dim=(2, 3))  # (N,K); exports as ReduceMean at any size
        n, k, h, w = a.shape
        p = self.pool_size
        if h % p == 0 and w % p == 0:
            pooled = F.adaptive_avg_pool2d(a, p)  # uniform cells: exports as AveragePool
        else:
            # Uneven cells (e.g. 2x2 or 5x5 maps into 7x7): ONNX has no adaptive pooling, so
            # apply it as the linear map it is. The matrix depends only on the (static at
            # export) map size and becomes a constant of the graph.
            m = _adaptive_pool_matrix(int(h), int(w), p, a.dtype, a.device)  # (P*P, h*w)
            pooled = (a.reshape(n, k, h * w) @ m.t()).reshape(n, k, p, p)
        return pooled.flatten(1)  # (N,K*P*P), index k*P*P + cell as W1 expects

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """A (N,K,h,w) -> logits (N,C)."""
        return self.classifier(self._pool(a))

    def forward_with_cam(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: logits (N,C) and raw class maps (N,C,h,w) (ReLU applied, not normalised)."""
        n, k, h, w = a.shape
        z = self._pool(a)
        linears: list[nn.Linear] = []
        slopes: list[torch.Tensor | None] = []  # activation slope after each Linear, or None
        for mod in self.classifier:
            if isinstance(mod, nn.Linear):
                linears.append(mod)
                slopes.append(None)
            elif isinstance(mod, _ACTIVATIONS):
                s = _activation_slope(mod, z)
                slopes[-1] = s if slopes[-1] is None else slopes[-1] * s
            z = mod(z)
        logits = z  # (N,C)

        cells = self.pool_size * self.pool_size
        w_first = linears[0].weight  # (D1, K*cells)
        # K from the weight, not from A's shape: the kernel then folds to a graph constant.
        w1pool = w_first.reshape(w_first.shape[0], w_first.shape[1] // cells, cells).sum(
            -1
        )  # (D1,K)
        if len(linears) == 1:
            alpha = w1pool  # (C,K), the same for every image: a 1x1 conv kernel
            cam = F.conv2d(a, alpha[:, :, None, None])  # (N,C,h,w)
        else:
            g = linears[-1].weight.unsqueeze(0)  # (1,C,D_{L-1})
            for i in range(len(linears) - 2, -1, -1):
                s = slopes[i]
                if s is not None:
                    g = g * s.unsqueeze(1)  # (N,C,D_i)
                if i > 0:
                    g = g @ linears[i].weight  # (N,C,D_{i-1})
            alpha = g @ w1pool  # (N,C,K)
            cam = (alpha @ a.reshape(n, k, h * w)).reshape(n, -1, h, w)  # (N,C,h,w)
        return logits, F.relu(cam) / (h * w)

    def cam(self, a: torch.Tensor) -> torch.Tensor:
        """Raw class maps (N,C,h,w) of A."""
        return self.forward_with_cam(a)[1]


class FusionHead(nn.Module):
    """One linear layer over the concatenated globally pooled features of all members.

    Its CAM for member m is the pooled-linear CAM with the slice of the weight that reads
    m's channels (the other members' contributions are constant over m's map).

    Args:
        feature_dims: K of every member, in member order.
        num_classes: C.
        dropout: dropout probability on the concatenated features (training only).
    """

    def __init__(self, feature_dims: Sequence[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.feature_dims = [int(d) for d in feature_dims]
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(sum(self.feature_dims), num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """[A_m (N,K_m,h_m,w_m)] -> fused logits (N,C)."""
        pooled = torch.cat([a.mean(dim=(2, 3)) for a in feats], dim=1)  # (N, sum K_m)
        return self.linear(self.dropout(pooled))

    def cams(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw maps per member: [(N,C,h_m,w_m)]."""
        out = []
        for w_m, a in zip(self.linear.weight.split(self.feature_dims, dim=1), feats, strict=True):
            h, w = a.shape[-2:]
            out.append(F.relu(F.conv2d(a, w_m[:, :, None, None])) / (h * w))
        return out

    def forward_with_cam(
        self, feats: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fused logits (N,C) and per-member raw maps [(N,C,h_m,w_m)]."""
        return self.forward(feats), self.cams(feats)
