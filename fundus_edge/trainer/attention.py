"""Where the enhanced view looks: attention strategies, one object per way of making it.

A strategy turns a batch into the views the loss sees::

    NoAttention        x --head--> logits                         (warm-up, enhance.op none)
    KernelAttention    x --Ensemble.forward(x, targets)--> logits, cams, attention (N,1,h,w)
                         --enhance(x, attention)--> logits_enhanced          (one pass)
    GradCamAttention   attention from the grad-cam package (one backward per member and
                       class present; before the step's forward), then as above

The config picks the enhanced epochs' strategy once (:func:`from_config`); the warm-up epochs
use :class:`NoAttention`. ``prepare`` runs outside the module DistributedDataParallel wraps
(the grad-cam package's own backward passes must not reach DDP's gradient hooks), ``views``
inside it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fundus_edge.config import CAM_METHODS, EnhanceSection
from fundus_edge.errors import UserError

__all__ = [
    "GRADCAM_METHODS",
    "AttentionStrategy",
    "GradCamAttention",
    "KernelAttention",
    "NoAttention",
    "cam_attention_gradcam",
    "from_config",
    "from_mode",
]

#: The ``grad-cam`` package's methods ``enhance.cam_method`` may name.
GRADCAM_METHODS = tuple(m for m in CAM_METHODS if m != "kernel")


class AttentionStrategy:
    """How a training step makes its views; the base class is the plain one (no enhanced view).

    Attributes:
        name: what ``training_step(mode=...)`` and the logs call it.
        enhances: whether there is a second, attention-enhanced view.
        use_targets: the attention follows the true labels (``enhance.train_weights:
            targets``; images without any fall back to the predictions), else the predictions.
    """

    name = "plain"
    enhances = False

    def __init__(self, use_targets: bool = True) -> None:
        self.use_targets = use_targets

    def check(self, ensemble: nn.Module) -> None:
        """Refuse a model that cannot make this strategy's views.

        Raises:
            UserError: an enhancing strategy on a model built with ``views="original"``.
        """
        if self.enhances and ensemble.config.views != "both":
            raise UserError(f"mode {self.name!r} needs a model built with views='both'")

    def prepare(
        self,
        ensemble: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        restore_mode: Callable[[], None],
    ) -> torch.Tensor | None:
        """Anything computed before (outside) the step's forward; None when nothing is."""
        return None

    def views(
        self,
        ensemble: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        prepared: torch.Tensor | None,
        want_cams: bool,
    ) -> dict[str, torch.Tensor]:
        """The forward: ``logits`` (N,M',C); ``logits_enhanced`` (N,M',C) when the strategy
        enhances; ``cams`` (N,M,C,h,w) with their graph when ``want_cams``."""
        if want_cams:
            logits, cams = ensemble.first_pass(x)  # (N,M',C), (N,M,C,h,w)
            return {"logits": logits, "cams": cams}
        return {"logits": ensemble.head_logits(x)}

    def _targets(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.use_targets else None


class NoAttention(AttentionStrategy):
    """The original view only (warm-up epochs, ``enhance.op: none``)."""


class KernelAttention(AttentionStrategy):
    """Maps from the model's forward-only CAM kernels of the same pass, then the enhanced view."""

    name = "kernel"
    enhances = True

    def views(self, ensemble, x, y, prepared, want_cams):
        out = ensemble(x, self._targets(y))
        views = {"logits": out["logits"], "logits_enhanced": out["logits_enhanced"]}
        if want_cams:
            views["cams"] = out["cams"]
        return views


class GradCamAttention(AttentionStrategy):
    """Maps from the ``grad-cam`` package (slow; for comparison with the kernels).

    Args:
        method: one of :data:`GRADCAM_METHODS`.
        use_targets: as for :class:`AttentionStrategy`.
    """

    enhances = True

    def __init__(self, method: str, use_targets: bool = True) -> None:
        super().__init__(use_targets)
        if method not in GRADCAM_METHODS:
            raise UserError(f"cam method {method!r}: choose one of {', '.join(GRADCAM_METHODS)}")
        self.name = method

    def prepare(self, ensemble, x, y, restore_mode):
        """The attention (N,1,H,W) from the package's maps, the model left as it was."""
        targets = self._targets(y)
        with torch.no_grad():
            probs = torch.sigmoid(ensemble.head_logits(x)).mean(1)  # (N,C)
        w = (
            probs
            if targets is None
            else torch.where(targets.sum(1, keepdim=True) > 0, targets, probs)
        )
        attention = cam_attention_gradcam(ensemble, x, w, self.name).detach()  # (N,1,H,W)
        ensemble.zero_grad(set_to_none=True)  # the package's backward passes left gradients
        restore_mode()  # and it switched the model to eval mode
        return attention

    def views(self, ensemble, x, y, prepared, want_cams):
        views = super().views(ensemble, x, y, None, want_cams)
        views["logits_enhanced"] = ensemble.head_logits(ensemble.enhance(x, prepared))
        return views


def from_config(enhance: EnhanceSection) -> AttentionStrategy:
    """The strategy of the enhanced epochs (after ``enhance.warmup_epochs``)."""
    use_targets = enhance.train_weights == "targets"
    if enhance.op == "none":
        return NoAttention(use_targets)
    if enhance.cam_method == "kernel":
        return KernelAttention(use_targets)
    return GradCamAttention(enhance.cam_method, use_targets)


def from_mode(mode: str, train_weights: str = "targets") -> AttentionStrategy:
    """``"plain"``, ``"kernel"`` or a grad-cam method name -> its strategy.

    Raises:
        UserError: any other name.
    """
    use_targets = train_weights == "targets"
    if mode == "plain":
        return NoAttention(use_targets)
    if mode == "kernel":
        return KernelAttention(use_targets)
    if mode in GRADCAM_METHODS:
        return GradCamAttention(mode, use_targets)
    raise UserError(f"mode {mode!r}: choose plain, kernel or one of {', '.join(GRADCAM_METHODS)}")


class _LogitsView(nn.Module):
    """(N,3,H,W) -> (N,C) mean head logits: the model the grad-cam package sees."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.head_logits(x).mean(dim=1)


def cam_attention_gradcam(
    ensemble: nn.Module, x: torch.Tensor, weights: torch.Tensor, method: str
) -> torch.Tensor:
    """Attention (N,1,H,W) from the ``grad-cam`` package's maps (the slow comparison path).

    For each member (its ``target_layer``) and each class with a non-zero weight in the batch,
    one ``grad-cam`` call with ``ClassifierOutputTarget(c)`` for every image gives normalised
    maps at input resolution; they are combined as the kernel path does
    (:meth:`Ensemble.attention_from`). The package calls ``model.eval()`` and accumulates
    parameter gradients: the caller restores the training mode and zeroes the gradients.
    """
    from fundus_edge.errors import require

    require("pytorch_grad_cam", purpose="--cam-method " + method)
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "hirescam": pgc.HiResCAM,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
    }
    cls = classes[method]
    n, _, h, w = x.shape
    c = weights.shape[1]
    members = list(ensemble.members)
    maps = torch.zeros(n, len(members), c, h, w, device=x.device)  # (N,M,C,H,W)
    view = _LogitsView(ensemble)
    active = [j for j in range(c) if float(weights[:, j].sum()) > 0]
    for mi, member in enumerate(members):
        with cls(model=view, target_layers=[member.target_layer]) as cam:
            for j in active:
                g = cam(input_tensor=x, targets=[ClassifierOutputTarget(j)] * n)  # (N,H,W)
                maps[:, mi, j] = torch.from_numpy(np.ascontiguousarray(g)).to(x.device)
    return ensemble.attention_from(maps, weights.detach())
