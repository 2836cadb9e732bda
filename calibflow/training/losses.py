"""Train-time calibration: the training losses and the batch mixing (mixup, CutMix).

Every loss takes logits (N, K) and targets that are either class indices (N,) or probability
rows (N, K) (what mixup and CutMix produce), and applies label smoothing to the targets first, so
each composes with label smoothing and with mixing. Each is checked in tests/test_losses.py
against a slow reference or a published closed form.

- cross_entropy: torch's own (it already takes probability targets and label smoothing).
- focal (Lin et al. 2017; for calibration Mukhoti et al. 2020): -sum_k t_k (1 - p_k)^gamma log p_k,
  which is cross-entropy at gamma = 0.
- flsd53 (Mukhoti et al. 2020, "sample-dependent" focal loss): gamma = 5 where p_k < 0.2 and 3
  otherwise, the schedule of their best CIFAR models.
- confidence_penalty (Pereyra et al. 2017): cross-entropy - beta * H(p).
- mmce (Kumar, Sarawagi & Jain 2018): cross-entropy + lambda * sqrt(MMCE^2), the kernel
  calibration error of the batch with the Laplacian kernel exp(-|r_i - r_j| / 0.4) on top-label
  confidences r.

Mixing uses torchvision.transforms.v2's MixUp and CutMix (a well-kept implementation of both
papers: one lambda ~ Beta(alpha, alpha) per batch, the batch paired with itself rolled by one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "focal", "flsd53", "confidence_penalty", "mmce")
MIXES = ("none", "mixup", "cutmix")
# FLSD-53 (Mukhoti et al. 2020, section 5): gamma 5 for a probability under 0.2, else 3.
FLSD_THRESHOLD, FLSD_LOW_P_GAMMA, FLSD_GAMMA = 0.2, 5.0, 3.0
# Kumar et al. 2018 use a Laplacian kernel of width 0.4 on the confidences.
MMCE_KERNEL_WIDTH = 0.4


def target_distribution(targets: torch.Tensor, n_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Class indices (N,) or probability rows (N, K) as smoothed probability rows (N, K), float32:
    (1 - eps) * t + eps / K, the smoothing torch's cross_entropy applies."""
    if targets.ndim == 1:
        t = F.one_hot(targets.long(), n_classes).float()
    else:
        t = targets.float()
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / n_classes
    return t


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float | None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean focal loss -sum_k t_k (1 - p_k)^gamma log p_k; gamma None: the FLSD-53 schedule."""
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    t = target_distribution(targets, logits.shape[1], label_smoothing)
    if gamma is None:
        # The schedule picks gamma from p itself; it is a choice, not something to differentiate.
        g = torch.where(p.detach() < FLSD_THRESHOLD, FLSD_LOW_P_GAMMA, FLSD_GAMMA)
    else:
        g = torch.full_like(p, float(gamma))
    # (1 - p)^0 is 1 even where p == 1, so gamma 0 is exactly cross-entropy.
    weight = (1.0 - p).clamp_min(0.0).pow(g)
    return -(t * weight * log_p).sum(dim=1).mean()


def confidence_penalty_loss(
    logits: torch.Tensor, targets: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Pereyra et al. 2017: cross-entropy - beta * H(p), both batch means."""
    log_p = F.log_softmax(logits.float(), dim=1)
    t = target_distribution(targets, logits.shape[1], label_smoothing)
    cross_entropy = -(t * log_p).sum(dim=1).mean()
    entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
    return cross_entropy - beta * entropy


def mmce_squared(probabilities: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Kumar et al. 2018's MMCE^2 of a batch: (1/m^2) sum_ij (c_i - r_i)(c_j - r_j) k(r_i, r_j),
    r the top-label confidence, c in [0, 1] whether (or how much) the top label is right.
    Differentiable in r; an O(m^2) kernel matrix, as in the paper (m is a batch)."""
    r = probabilities.max(dim=1).values
    residual = correct.float() - r
    kernel = torch.exp(-(r[:, None] - r[None, :]).abs() / MMCE_KERNEL_WIDTH)
    m = len(r)
    return (residual[:, None] * residual[None, :] * kernel).sum() / (m * m)


def mmce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy + weight * sqrt(MMCE^2). With probability targets (mixup), an image's
    correctness is the target mass on its predicted class."""
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    t = target_distribution(targets, logits.shape[1], label_smoothing)
    cross_entropy = -(t * log_p).sum(dim=1).mean()
    hard = targets if targets.ndim == 1 else None
    predicted = p.detach().argmax(dim=1)
    if hard is not None:
        correct = (predicted == hard).float()
    else:
        correct = targets.float().gather(1, predicted[:, None]).squeeze(1)
    # sqrt's gradient is infinite at 0: a perfectly calibrated batch would give NaN steps.
    return cross_entropy + weight * mmce_squared(p, correct).clamp_min(1e-12).sqrt()


def training_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "cross_entropy",
    label_smoothing: float = 0.0,
    focal_gamma: float = 3.0,
    confidence_penalty: float = 0.1,
    mmce_weight: float = 2.0,
) -> torch.Tensor:
    """The configured training loss (train.loss and its parameters) of a batch, a scalar."""
    if loss == "cross_entropy":
        target = targets.long() if targets.ndim == 1 else targets.float()
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if loss == "focal":
        return focal_loss(logits, targets, focal_gamma, label_smoothing)
    if loss == "flsd53":
        return focal_loss(logits, targets, None, label_smoothing)
    if loss == "confidence_penalty":
        return confidence_penalty_loss(logits, targets, confidence_penalty, label_smoothing)
    if loss == "mmce":
        return mmce_loss(logits, targets, mmce_weight, label_smoothing)
    raise ValueError(f"unknown train.loss {loss!r}: use one of {', '.join(LOSSES)}")


OUTLIER_EXPOSURE_WEIGHT = 0.5  # Hendrycks, Mazeika & Dietterich 2019 (lambda = 0.5 for vision)


def outlier_exposure_loss(outlier_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the uniform distribution to the softmax of outliers' logits, averaged
    over them: mean_i (logsumexp(z_i) - mean_k z_ik). Its minimum, log K, is reached exactly
    when every outlier's softmax is uniform."""
    z = outlier_logits.float()
    return (torch.logsumexp(z, dim=1) - z.mean(dim=1)).mean()


class BatchMixer:
    """train.mix: mixup or CutMix of a batch of float images in [0, 1] and their labels (or soft targets), by
    torchvision.transforms.v2. Returns the mixed images and probability targets (N, K); "none"
    returns the batch and its class indices unchanged. Its draws come from torch's global
    generator, which the training loop seeds."""

    def __init__(self, mix: str, alpha: float, n_classes: int):
        self.mix = mix
        if mix not in MIXES:
            raise ValueError(f"unknown train.mix {mix!r}: use one of {', '.join(MIXES)}")
        self.transform = None
        if mix != "none":
            # Imported only when used: transforms.v2 adds to every run's start-up otherwise.
            from torchvision.transforms import v2

            self.transform = (v2.MixUp if mix == "mixup" else v2.CutMix)(alpha=alpha, num_classes=n_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`labels`: class indices (N,), or distributions (N, K) under train.targets soft, which
        torchvision mixes as it mixes the one-hot rows of indices."""
        if self.transform is None:
            return images, labels
        return self.transform(images, labels.long() if labels.ndim == 1 else labels.float())
