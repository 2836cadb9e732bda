"""Deep ensembles and MC dropout: the logits a model of several members (or several stochastic
passes) gives, the calibrator of an ensemble, and the probabilities the served model returns.

Shapes: a single network's logits are (N, K), as everywhere else in calibflow. An ensemble of M
members gives (N, M, K), one row of logits per member, so that each member gets its own
calibrator (fitted on its own calibration logits) and the served probabilities are the mean of
the members' calibrated probabilities (Lakshminarayanan et al. 2017 average probabilities; each
member is calibrated first). With temperature scaling the members share one T, fitted on the
NLL of their mean: calibrated one by one, their mean is under-confident (see EnsembleCalibrator.fit).

MC dropout (Gal & Ghahramani 2016) draws S dropout masks on the features that enter the
classifier head, one mask per pass shared by every image: that is one sampled weight matrix per
pass, the paper's view of dropout. The features are computed once and only the head runs S
times, and the masks come from a generator seeded with the model's seed, so a prediction does not
depend on the batch an image arrives in or on anything else the process has drawn. A member's
"logits" are then log of the mean of its S softmax outputs: softmax of them is exactly that mean,
so every calibrator applies to them unchanged.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import torch

from calibflow.data.image_files import ImageSource
from calibflow.errors import CalibrationError
from calibflow.calibrators.temperature import DEFAULT_MAX_TEMPERATURE, DEFAULT_MIN_TEMPERATURE
from calibflow.calibrators import Calibrator, TemperatureCalibrator, calibrator_from_state, fit_calibrator
from calibflow.metrics import ArrayLike
from calibflow.training.models import DropoutHead, ImageClassifier
from calibflow.training.loop import collect_logits

ENSEMBLE_METHOD = "ensemble"
# log(0) would make a logit of -inf, which calibrators and NLL turn into NaN; the smallest normal
# float32 keeps the ratio of any two probabilities a float32 can tell apart.
SMALLEST_PROBABILITY = float(torch.finfo(torch.float32).tiny)


def member_seeds(seed: int, members: int) -> list[int]:
    """Member i trains with seed + i: different initialisations and data orders, the only source of
    diversity a deep ensemble needs (Lakshminarayanan et al. 2017)."""
    return [seed + i for i in range(members)]


def dropout_head(model: ImageClassifier) -> DropoutHead:
    heads = [m for m in model.modules() if isinstance(m, DropoutHead)]
    if not heads:
        raise ValueError("MC dropout needs a model built with model.dropout > 0 (it has no dropout head)")
    return heads[-1]


@torch.no_grad()
def mc_dropout_logits(
    model: ImageClassifier,
    images: ImageSource,
    samples: int,
    seed: int,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: str | None = None,
    *,
    workers: int = 0,
) -> torch.Tensor:
    """log of the mean softmax of `samples` passes with dropout on (N, K), float32."""
    head = dropout_head(model)
    features: list[torch.Tensor] = []
    # The served model answers requests on several threads at once, each with its own hook on the
    # one shared head: each keeps the features of its own thread's forward passes only.
    thread = threading.get_ident()

    def keep(module, args) -> None:
        if threading.get_ident() == thread:
            features.append(args[0].float().cpu())

    hook = head.register_forward_pre_hook(keep)
    try:
        # eval mode: one deterministic pass to the head
        collect_logits(model, images, batch_size, device, progress, workers=workers)
    finally:
        hook.remove()
    if not features:
        return torch.empty(0, 0)
    x = torch.cat(features).double()
    dropout, linear = head[0], head[1]
    keep = 1.0 - dropout.p
    weight, bias = linear.weight.detach().double().cpu(), linear.bias.detach().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    mean = torch.zeros(len(x), weight.shape[0], dtype=torch.float64)
    for _ in range(samples):
        mask = (torch.rand(x.shape[1], generator=generator, dtype=torch.float64) < keep).double() / keep
        mean += torch.softmax((x * mask) @ weight.T + bias, dim=1)
    return (mean / samples).clamp_min(SMALLEST_PROBABILITY).log().float()


def predictive_logits(
    members: Sequence[ImageClassifier],
    images: ImageSource,
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: str | None = None,
    *,
    workers: int = 0,
) -> torch.Tensor:
    """The logits a model of these members gives `images`: (N, K) for one member, (N, M, K) for M.
    With mc_samples > 1 each member's are its MC dropout logits (member i's masks seeded seed + i).
    `progress`: the label of a progress bar per member (on a terminal only)."""
    outputs = []
    for i, member in enumerate(members):
        label = progress if progress is None or len(members) == 1 else f"{progress} (member {i + 1}/{len(members)})"
        if mc_samples > 1:
            outputs.append(
                mc_dropout_logits(member, images, mc_samples, seed + i, batch_size, device, label, workers=workers)
            )
        else:
            outputs.append(collect_logits(member, images, batch_size, device, label, workers=workers))
    return outputs[0] if len(outputs) == 1 else torch.stack(outputs, dim=1)


def uncalibrated_probabilities(logits: ArrayLike) -> torch.Tensor:
    """softmax (N, K) of one network's logits; the mean of the members' softmax for (N, M, K); float64."""
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()
    p = torch.softmax(z, dim=-1)
    return p.mean(dim=1) if p.ndim == 3 else p


class EnsembleCalibrator:
    """One calibrator per member, each fitted on its member's logits; transform: the mean of the
    members' calibrated probabilities. Has the Calibrator interface the pipeline and the served
    model use (fit, transform, to_state, method, n_classes)."""

    method = ENSEMBLE_METHOD

    def __init__(self, members: Sequence[Calibrator] = ()):
        self.members = list(members)
        self.selection = None

    @property
    def n_classes(self) -> int | None:
        return self.members[0].n_classes if self.members else None

    @property
    def member_method(self) -> str:
        return self.members[0].method

    @property
    def temperature(self) -> float | None:
        """No single T: the pipeline reports the members' temperatures through to_state()."""
        return None

    @classmethod
    def fit(cls, method: str, logits: ArrayLike, labels: ArrayLike, **options: Any) -> EnsembleCalibrator:
        """temperature: one T for every member, fitted on the NLL of the members' mean, so the served
        mean of calibrated probabilities is itself calibrated. Each member scaled to its own
        optimum makes an under-confident mean (averaging already softens it): on the over-confident
        CIFAR-10 recipe, 3 members so fitted raised the calibration NLL 1.2492 -> 1.2548 and the run
        was refused. Other methods: one fit per member."""
        z = torch.as_tensor(np.asarray(logits))
        if z.ndim != 3:
            raise ValueError(f"ensemble logits must be (N, members, K); got shape {tuple(z.shape)}")
        if method == "temperature":
            temperature = fit_shared_temperature(
                z,
                labels,
                options.get("min_temperature", DEFAULT_MIN_TEMPERATURE),
                options.get("max_temperature", DEFAULT_MAX_TEMPERATURE),
            )
            members = []
            for _ in range(z.shape[1]):
                member = TemperatureCalibrator(**options)
                member.temperature, member.n_classes = temperature, int(z.shape[2])
                members.append(member)
            return cls(members)
        return cls([fit_calibrator(method, z[:, m], labels, **options) for m in range(z.shape[1])])

    def transform(self, logits: ArrayLike) -> torch.Tensor:
        z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
        if z.ndim != 3 or z.shape[1] != len(self.members):
            raise ValueError(
                f"expected logits (N, {len(self.members)}, K) for an ensemble of {len(self.members)}; "
                f"got shape {tuple(z.shape)}"
            )
        return torch.stack([c.transform(z[:, m]) for m, c in enumerate(self.members)]).mean(dim=0)

    def to_state(self) -> dict[str, Any]:
        return {"method": ENSEMBLE_METHOD, "n_classes": self.n_classes, "members": [c.to_state() for c in self.members]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EnsembleCalibrator:
        return cls([calibrator_from_state(member) for member in state["members"]])


def ensemble_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """NLL of the mean over members of softmax(logits / T), logits (N, M, K), in float64."""
    p = torch.softmax(logits.double() / temperature, dim=-1).mean(dim=1)
    return float(-p[torch.arange(len(labels)), labels].clamp_min(SMALLEST_PROBABILITY).log().mean())


def fit_shared_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    min_temperature: float = DEFAULT_MIN_TEMPERATURE,
    max_temperature: float = DEFAULT_MAX_TEMPERATURE,
) -> float:
    """The T minimising ensemble_nll, by a bounded 1-D search on log T (scipy). An optimum on an
    end of the range is an error, as for a single network's fit."""
    from scipy.optimize import minimize_scalar

    z = torch.as_tensor(np.asarray(logits)).double()
    y = torch.as_tensor(np.asarray(labels)).long()
    low, high = np.log(min_temperature), np.log(max_temperature)
    result = minimize_scalar(
        lambda log_t: ensemble_nll(z, y, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-7},
    )
    edge = 1e-4 * (high - low)
    if not result.success or result.x < low + edge or result.x > high - edge:
        raise CalibrationError(
            f"no interior temperature optimum for the ensemble in [{min_temperature}, "
            f"{max_temperature}] (found T = {np.exp(result.x):.4g}); check the calibration "
            f"split, or widen calibration.min_temperature / max_temperature"
        )
    return float(np.exp(result.x))


def fit_model_calibrator(method: str, logits: ArrayLike, labels: ArrayLike, **options: Any):
    """The calibrator of a model's logits: `method` itself for (N, K), one per member for (N, M, K)."""
    if np.ndim(logits) == 3:
        return EnsembleCalibrator.fit(method, logits, labels, **options)
    return fit_calibrator(method, logits, labels, **options)


def model_calibrator_from_state(state: dict[str, Any]):
    if state.get("method") == ENSEMBLE_METHOD:
        return EnsembleCalibrator.from_state(state)
    return calibrator_from_state(state)


def served_probabilities(
    members: Sequence[ImageClassifier],
    calibrator,
    images: torch.Tensor,
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 512,
) -> torch.Tensor:
    """What the registered model serves for uint8 images (N, C, H, W): the calibrated probabilities
    of its members' (MC dropout) logits, averaged over members; float64 (N, K)."""
    return calibrator.transform(predictive_logits(members, images, mc_samples, seed, batch_size))
