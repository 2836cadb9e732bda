"""Train-time calibration losses and mixing, each against a slow reference or a closed form."""

import math

import pytest
import torch
import torch.nn.functional as F

from calibflow.training.losses import (
    BatchMixer,
    confidence_penalty_loss,
    focal_loss,
    mmce_loss,
    mmce_squared,
    target_distribution,
    training_loss,
)


def batch(n=12, k=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * scale, torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_0_is_cross_entropy(smoothing):
    z, y = batch()
    torch.testing.assert_close(
        focal_loss(z, y, 0.0, smoothing), F.cross_entropy(z.float(), y, label_smoothing=smoothing), rtol=1e-6, atol=1e-6
    )


def test_focal_matches_its_formula_per_sample():
    z, y = batch(scale=1.0)
    p = torch.softmax(z, 1)
    expected = torch.stack([-((1 - p[i, y[i]]) ** 2) * torch.log(p[i, y[i]]) for i in range(len(y))]).mean()
    torch.testing.assert_close(focal_loss(z, y, 2.0).double(), expected, rtol=1e-5, atol=1e-6)


def test_flsd53_uses_gamma_5_below_p_0_2_and_3_above():
    """Mukhoti et al. 2020: gamma 5 for p_true in [0, 0.2), 3 for [0.2, 1]."""
    # Two samples: p_true = 0.1 and p_true = 0.6 (three classes).
    p = torch.tensor([[0.1, 0.45, 0.45], [0.6, 0.3, 0.1]], dtype=torch.float64)
    z, y = p.log(), torch.tensor([0, 0])
    expected = (-(0.9**5) * math.log(0.1) - (0.4**3) * math.log(0.6)) / 2
    assert training_loss(z, y, "flsd53").item() == pytest.approx(expected, rel=1e-5)
    # either side of the boundary (exactly 0.2 is not representable after a float32 softmax)
    for p_true, gamma in ((0.201, 3), (0.199, 5)):
        p = torch.tensor([[p_true, (1 - p_true) / 2, (1 - p_true) / 2]], dtype=torch.float64)
        expected = -((1 - p_true) ** gamma) * math.log(p_true)
        assert training_loss(p.log(), torch.tensor([0]), "flsd53").item() == pytest.approx(expected, rel=1e-5)


def direct_mmce_squared(r, c):
    """Kumar et al. 2018, eq. (1) squared, by a double loop over the batch."""
    m = len(r)
    total = 0.0
    for i in range(m):
        for j in range(m):
            total += (c[i] - r[i]) * (c[j] - r[j]) * math.exp(-abs(r[i] - r[j]) / 0.4)
    return total / m**2


def test_mmce_matches_a_direct_kernel_computation():
    z, y = batch(n=9, k=4, seed=3)
    p = torch.softmax(z, 1)
    r, predicted = p.max(1)
    c = (predicted == y).double()
    expected = direct_mmce_squared(r.tolist(), c.tolist())
    assert mmce_squared(p, c).item() == pytest.approx(expected, rel=1e-9)
    loss = mmce_loss(z, y, weight=2.0)
    assert loss.item() == pytest.approx(F.cross_entropy(z, y).item() + 2.0 * math.sqrt(expected), rel=1e-6)


def test_mmce_term_is_zero_for_a_calibrated_batch_and_its_gradient_is_finite():
    # every image at confidence 0.5, half of them right: calibrated, MMCE 0
    z = torch.tensor([[0.0, 0.0, -50.0]] * 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    assert mmce_squared(torch.softmax(z, 1), torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-12)
    mmce_loss(z, y, 2.0).backward()
    assert torch.isfinite(z.grad).all()


def test_confidence_penalty_gradient_matches_finite_differences():
    """Pereyra et al. 2017: loss = CE - beta * H(p); torch's gradient against central differences."""
    z, y = batch(n=6, k=4, seed=5, scale=1.5)
    z.requires_grad_(True)
    loss = confidence_penalty_loss(z, y, beta=0.7)
    loss.backward()
    analytic = z.grad.clone()

    def value(logits):
        p = torch.softmax(logits, 1)
        entropy = -(p * p.log()).sum(1)
        return (F.cross_entropy(logits, y, reduction="none") - 0.7 * entropy).mean().item()

    numeric = torch.zeros_like(z)
    eps = 1e-6
    for index in range(z.numel()):
        step = torch.zeros(z.numel(), dtype=torch.float64)
        step[index] = eps
        step = step.view_as(z)
        numeric.view(-1)[index] = (value(z.detach() + step) - value(z.detach() - step)) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-6)


def test_confidence_penalty_gradient_has_the_closed_form():
    """d/dz [-beta H(softmax z)] = beta * p * (log p + H): the penalty pushes toward higher entropy."""
    z, y = batch(n=5, k=3, seed=8, scale=1.0)
    z.requires_grad_(True)
    (confidence_penalty_loss(z, y, beta=1.0) - F.cross_entropy(z, y)).backward()
    p = torch.softmax(z.detach(), 1)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    torch.testing.assert_close(z.grad, p * (p.log() + entropy) / len(z), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "flsd53", "confidence_penalty", "mmce"])
def test_every_loss_takes_probability_targets_as_it_takes_the_equivalent_indices(loss):
    z, y = batch()
    hard = training_loss(z, y, loss, label_smoothing=0.1)
    soft = training_loss(z, F.one_hot(y, 5).double(), loss, label_smoothing=0.1)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)


def test_label_smoothing_is_torchs():
    t = target_distribution(torch.tensor([2]), 4, 0.2)
    torch.testing.assert_close(t, torch.tensor([[0.05, 0.05, 0.85, 0.05]]))


def test_mixup_blends_images_and_labels_with_one_lambda():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, targets = BatchMixer("mixup", 0.4, 5)(images, labels)
    assert targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    # lambda: the weight of each image's own label; its partner is the batch rolled by one
    lam = targets[1, 1].item()  # image 1 (label 1) is mixed with image 0 (label 0)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0), rtol=1e-5, atol=1e-6)
    expected = lam * F.one_hot(labels, 5).float() + (1 - lam) * F.one_hot(labels.roll(1, 0), 5).float()
    torch.testing.assert_close(targets, expected)


def test_cutmix_pastes_a_box_and_weighs_labels_by_its_area():
    torch.manual_seed(1)
    images = torch.zeros(4, 1, 16, 16)
    images[1::2] = 1.0  # partners differ everywhere
    labels = torch.tensor([0, 1, 0, 1])
    mixed, targets = BatchMixer("cutmix", 1.0, 2)(images, labels)
    # image 0 (zeros) got a box from image 3 (ones): the pasted fraction is its label-1 weight
    pasted = mixed[0].mean().item()
    assert targets[0, 1].item() == pytest.approx(pasted, abs=1e-6)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_no_mixing_returns_the_batch_unchanged():
    images, labels = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    out_images, out_labels = BatchMixer("none", 1.0, 3)(images, labels)
    assert out_images is images and out_labels is labels
