"""torchmetrics Metrics for diffusion unlearning: per-class recognition by a judge, Fréchet distance in its features.

How concept erasure is scored in the field (ESD, arXiv 2303.07345; SalUn, arXiv 2310.12508; and
"Efficient Fine-Tuning and Concept Suppression for Pruned Diffusion Models", arXiv 2412.15341):

* *unlearning accuracy* — of the samples generated for the erased concept, the share a classifier
  still recognizes as it (lower is better); :class:`PromptedClassAccuracy` with ``classes=[c]``;
* *retained accuracy* — the same share over the other concepts (higher is better, it measures
  that they still render); :class:`PromptedClassAccuracy` with the retained classes;
* *fidelity* — a Fréchet distance between generated and real images. torchmetrics' FID needs
  Inception weights (a download), so :class:`JudgeFrechetDistance` computes the same statistic
  (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule...", arXiv 1706.08500) in the
  feature space of any frozen feature extractor — here the judge classifier's penultimate layer.

All states are sums (``dist_reduce_fx="sum"``), so they reduce correctly across DDP ranks.
Memory: :class:`JudgeFrechetDistance` keeps ``2 * (D + D^2)`` float64 sums for D-dimensional features
(about 66 KB at D=64); :class:`PromptedClassAccuracy` two integers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


class PromptedClassAccuracy(Metric):
    """Share of samples generated for a class in ``classes`` that the judge labels as that class.

    ``update(prompted, predicted)``: ``prompted`` is the class each sample was generated for,
    ``predicted`` the judge's label (or its logits, ``(N, K)``). Samples prompted with other classes
    are ignored.
    """

    higher_is_better = None
    full_state_update = False

    def __init__(self, classes: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        classes = list(classes)
        if not classes or not all(isinstance(c, int) for c in classes):
            raise ValueError(f"classes={classes!r} is invalid: give a non-empty list of int class ids.")
        self.register_buffer("_classes", torch.tensor(classes, dtype=torch.long), persistent=False)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prompted: Tensor, predicted: Tensor) -> None:
        """Count the samples prompted with a tracked class and those the judge put in that class."""
        if predicted.ndim == 2:
            predicted = predicted.argmax(dim=1)
        if prompted.shape != predicted.shape:
            raise ValueError(
                f"prompted shape {tuple(prompted.shape)} != predicted shape {tuple(predicted.shape)}: "
                "pass one prompted class and one judge label (or logits row) per sample."
            )
        mask = torch.isin(prompted, self._classes.to(prompted.device))
        self.hits += (predicted[mask] == prompted[mask]).sum()
        self.total += mask.sum()

    def compute(self) -> Tensor:
        """Recognized share in [0, 1] (NaN when no tracked sample was seen)."""
        if int(self.total) == 0:
            return torch.tensor(float("nan"))
        return self.hits.float() / self.total.float()


class JudgeFrechetDistance(Metric):
    """Fréchet distance between real and generated images in a frozen feature extractor's space.

    ``FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})`` with means and covariances of the
    features; the matrix square root is scipy's ``sqrtm`` (its tiny imaginary part is dropped).

    Args:
        feature_extractor: ``images -> (N, D) features`` (e.g. ``judge.features``); run under
            ``torch.no_grad``.
        feature_dim: D.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, feature_extractor: Callable[[Tensor], Tensor], feature_dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not callable(feature_extractor):
            raise TypeError(
                f"feature_extractor={feature_extractor!r} must be callable images -> (N, D) features."
            )
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim!r} is invalid: use the int width D of the features.")
        self._extract = feature_extractor
        self.feature_dim = feature_dim
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer",
                torch.zeros(feature_dim, feature_dim, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of real (``real=True``) or generated images."""
        with torch.no_grad():
            feats = self._extract(images)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(
                f"feature_extractor returned shape {tuple(feats.shape)}; expected (N, {self.feature_dim})."
            )
        feats = feats.double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + feats.shape[0])

    def _moments(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        n = int(getattr(self, f"{side}_n"))
        if n < 2:
            raise ValueError(
                f"JudgeFrechetDistance needs >= 2 {side} samples, got {n}: update it with more images."
            )
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean.cpu().numpy(), cov.cpu().numpy()

    def compute(self) -> Tensor:
        """The Fréchet distance (a float64 scalar tensor)."""
        from scipy import linalg

        mu_r, cov_r = self._moments("real")
        mu_g, cov_g = self._moments("fake")
        covmean = linalg.sqrtm(cov_r @ cov_g)
        if not np.isfinite(covmean).all():
            offset = np.eye(cov_r.shape[0]) * 1e-6
            covmean = linalg.sqrtm((cov_r + offset) @ (cov_g + offset))
        covmean = np.real(covmean)
        diff = mu_r - mu_g
        value = float(diff @ diff + np.trace(cov_r) + np.trace(cov_g) - 2.0 * np.trace(covmean))
        return torch.tensor(max(value, 0.0), dtype=torch.float64)


@torch.no_grad()
def evaluate_class_erasure(
    generate: Callable[[Tensor], Tensor],
    judge: torch.nn.Module,
    real_images: Tensor,
    real_labels: Tensor,
    forget_classes: Sequence[int],
    num_classes: int = 10,
    samples_per_class: int = 32,
    batch_size: int = 160,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Generate ``samples_per_class`` images of every class and score them with the judge.

    Returns ``({"forget_recognized", "retain_accuracy", "fd_retain"}, images, labels)``: the share of
    erased-class samples the judge still recognizes (unlearning accuracy, lower is better), the judge's
    accuracy on the retained classes' samples, and the Fréchet distance in the judge's features
    between the retained classes' samples and their real images.

    ``generate(labels) -> images in [-1, 1]`` is the model under test (e.g. a closure over
    :func:`lightning_zobi.diffusion.sampling.sample_class_conditional`); the judge must expose
    ``features`` and ``feature_dim`` (:class:`lightning_zobi.diffusion.judge.DigitsCNN`).
    """
    forget = [int(c) for c in forget_classes]
    retain = [c for c in range(num_classes) if c not in forget]
    if not retain:
        raise ValueError(f"forget_classes={forget!r} leaves no retained class out of {num_classes}.")
    device = next(judge.parameters()).device
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    images = torch.cat([generate(chunk).float().cpu() for chunk in labels.split(batch_size)])
    ua = PromptedClassAccuracy(forget)
    ra = PromptedClassAccuracy(retain)
    fd = JudgeFrechetDistance(lambda x: judge.features(x.to(device)).cpu(), judge.feature_dim)
    logits = torch.cat([judge(chunk.to(device)).cpu() for chunk in images.split(batch_size)])
    ua.update(labels, logits)
    ra.update(labels, logits)
    keep_real = ~torch.isin(real_labels, torch.tensor(forget))
    keep_fake = ~torch.isin(labels, torch.tensor(forget))
    fd.update(real_images[keep_real], real=True)
    fd.update(images[keep_fake], real=False)
    scores = {
        "forget_recognized": float(ua.compute()),
        "retain_accuracy": float(ra.compute()),
        "fd_retain": float(fd.compute()),
    }
    return scores, images, labels
