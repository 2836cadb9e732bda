"""Deep ensembles and MC dropout: what the served model computes, checked against its definition."""

import json

import numpy as np
import pytest
import torch

from calibflow.training.ensembles import (
    EnsembleCalibrator,
    ensemble_nll,
    fit_shared_temperature,
    mc_dropout_logits,
    model_calibrator_from_state,
    predictive_logits,
    served_probabilities,
    uncalibrated_probabilities,
)
from calibflow.training.models import ModelSpec, build_model, load_checkpoint, save_checkpoint


def images(n=40, seed=0):
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def members(count, dropout=0.0):
    spec = ModelSpec("small_cnn", 1, 4, 8, 8, width=4, dropout=dropout)
    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        out.append(build_model(spec).eval())
    return spec, out


def informative_labels(logits):
    """Labels the members' mean predicts two times in three, so each member's temperature has an
    interior optimum."""
    y = logits.mean(1).argmax(1)
    g = torch.Generator().manual_seed(1)
    noisy = torch.rand(len(y), generator=g) < 1 / 3
    return torch.where(noisy, torch.randint(0, 4, (len(y),), generator=g), y)


def test_ensemble_serves_the_mean_of_its_members_calibrated_probabilities():
    _, models = members(3)
    x = images(200)
    logits = predictive_logits(models, x)
    y = informative_labels(logits)
    assert logits.shape == (len(x), 3, 4)
    calibrator = EnsembleCalibrator.fit("temperature", logits, y)
    temperatures = [c.temperature for c in calibrator.members]
    assert len(set(temperatures)) == 1  # one T shared by the members, fitted on their mean
    expected = np.mean(
        [torch.softmax(m(x).double() / t, 1).detach().numpy() for m, t in zip(models, temperatures)], axis=0
    )
    served = served_probabilities(models, calibrator, x).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(served.sum(1), 1.0, rtol=1e-9)


@pytest.mark.slow
def test_shared_temperature_minimises_the_nll_of_the_members_mean():
    _, models = members(3)
    x = images(200)
    logits = predictive_logits(models, x).double()
    y = informative_labels(logits)
    t = fit_shared_temperature(logits, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([ensemble_nll(logits, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3)
    assert ensemble_nll(logits, y, t) <= ensemble_nll(logits, y, 1.0)


@pytest.mark.slow
def test_per_member_methods_other_than_temperature_are_fitted_one_by_one():
    _, models = members(2)
    x = images(200)
    logits = predictive_logits(models, x)
    calibrator = EnsembleCalibrator.fit("vector", logits, informative_labels(logits))
    assert [c.method for c in calibrator.members] == ["vector", "vector"]
    expected = (calibrator.members[0].transform(logits[:, 0]) + calibrator.members[1].transform(logits[:, 1])) / 2
    torch.testing.assert_close(calibrator.transform(logits), expected)


def test_ensemble_calibrator_state_round_trips_through_json():
    _, models = members(2)
    x = images(200)
    logits = predictive_logits(models, x)
    y = informative_labels(logits)
    calibrator = EnsembleCalibrator.fit("temperature", logits, y)
    rebuilt = model_calibrator_from_state(json.loads(json.dumps(calibrator.to_state())))
    torch.testing.assert_close(rebuilt.transform(logits), calibrator.transform(logits))


def test_uncalibrated_ensemble_probabilities_are_the_mean_softmax():
    z = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(uncalibrated_probabilities(z), torch.softmax(z, -1).mean(1))
    torch.testing.assert_close(uncalibrated_probabilities(z[:, 0]), torch.softmax(z[:, 0], -1))


def test_mc_dropout_is_deterministic_given_its_seed_and_independent_of_batching():
    _, (model,) = members(1, dropout=0.5)
    x = images()
    a = mc_dropout_logits(model, x, samples=16, seed=7)
    torch.testing.assert_close(mc_dropout_logits(model, x, samples=16, seed=7), a, rtol=0, atol=0)
    torch.testing.assert_close(mc_dropout_logits(model, x, samples=16, seed=7, batch_size=7), a)
    torch.testing.assert_close(mc_dropout_logits(model, x[10:20], samples=16, seed=7), a[10:20])
    assert not torch.allclose(mc_dropout_logits(model, x, samples=16, seed=8), a)
    torch.testing.assert_close(torch.softmax(a.double(), 1).sum(1), torch.ones(len(x), dtype=torch.float64))


def test_mc_dropout_is_the_mean_of_passes_with_one_mask_each():
    _, (model,) = members(1, dropout=0.3)
    x = images(6)
    head = model.backbone[-1]
    features = model.backbone[:-1](((x.float() / 255) - model.mean) / model.std).double()
    generator = torch.Generator().manual_seed(3)
    passes = []
    for _ in range(5):
        mask = (torch.rand(features.shape[1], generator=generator, dtype=torch.float64) < 0.7).double() / 0.7
        passes.append(torch.softmax((features * mask) @ head[1].weight.double().T + head[1].bias.double(), 1))
    expected = torch.stack(passes).mean(0).log().float()
    torch.testing.assert_close(mc_dropout_logits(model, x, samples=5, seed=3), expected.detach(), rtol=1e-5, atol=1e-5)


def test_mc_dropout_needs_a_dropout_head():
    _, (model,) = members(1)
    with pytest.raises(ValueError, match="model.dropout > 0"):
        mc_dropout_logits(model, images(), samples=4, seed=0)


def test_checkpoint_keeps_every_member_and_the_mc_setting(tmp_path):
    spec, models = members(3, dropout=0.2)
    path = save_checkpoint(
        tmp_path / "c.pt",
        models[0],
        spec,
        ["a", "b", "c", "d"],
        "L",
        more_members=tuple(models[1:]),
        mc_samples=9,
        mc_seed=4,
    )
    loaded = load_checkpoint(path)
    assert (len(loaded.members), loaded.mc_samples, loaded.mc_seed) == (3, 9, 4)
    x = images()
    torch.testing.assert_close(predictive_logits(loaded.members, x, 9, 4), predictive_logits(models, x, 9, 4))


def test_a_model_without_dropout_keeps_its_state_dict_keys():
    """Checkpoints and registered versions from before dropout existed still load."""
    spec, (model,) = members(1)
    assert "backbone.19.weight" in model.state_dict()
    assert not any(".19.1." in key for key in model.state_dict())


def test_mc_dropout_logits_of_requests_on_two_threads_keep_to_their_own_images():
    """The served model answers requests on several threads at once: request B, run while request
    A is inside its forward pass, must not add its rows to A's features (A read 10 rows for 6)."""
    import threading

    from calibflow.training.ensembles import mc_dropout_logits

    model = build_model(ModelSpec("small_cnn", 1, 3, 8, 8, width=4, dropout=0.3)).eval()
    generator = torch.Generator().manual_seed(0)
    a_images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=generator)
    b_images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=generator)
    a_alone, b_alone = mc_dropout_logits(model, a_images, 5, 0), mc_dropout_logits(model, b_images, 5, 0)
    a_inside, b_done, a_thread, answers = threading.Event(), threading.Event(), [], {}

    def hold_a(module, args):
        if a_thread and threading.get_ident() == a_thread[0]:
            a_inside.set()
            assert b_done.wait(timeout=30)

    def request_a():
        a_thread.append(threading.get_ident())
        answers["a"] = mc_dropout_logits(model, a_images, 5, 0)

    hold = model.backbone[0].register_forward_pre_hook(hold_a)
    try:
        a = threading.Thread(target=request_a)
        a.start()
        assert a_inside.wait(timeout=30)
        answers["b"] = mc_dropout_logits(model, b_images, 5, 0)
        b_done.set()
        a.join(timeout=60)
    finally:
        hold.remove()
    assert torch.equal(answers["a"], a_alone) and torch.equal(answers["b"], b_alone)
