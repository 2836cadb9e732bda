"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", section 4.2).

One scalar ``T > 0`` divides every logit, ``q = softmax(z / T)``, and is chosen to minimise the
mean negative log-likelihood on a held-out calibration split. Predictions (argmax) never change.

The fit is an exact 1-D solve, not gradient descent: with ``beta = 1/T`` the NLL

    L(beta) = (1/N) sum_i [ logsumexp_k(beta z_ik) - beta z_iy_i ]

is convex (a log-sum-exp of linear functions minus a linear term), with

    dL/dbeta   = (1/N) sum_i ( E_p[z_i] - z_iy_i )      (p = softmax(beta z_i))
    d2L/dbeta2 = (1/N) sum_i Var_p[z_i]  >= 0

so ``dL/dbeta`` is non-decreasing and changes sign at most once. We search ``t = log T`` over
``[log min_T, log max_T]`` for the root of ``g(t) = dL/dbeta at beta = exp(-t)`` (same sign
change as dL/dt up to the positive factor beta) with a bracketed Newton method that falls back to
bisection whenever the Newton step leaves the bracket or stalls ("rtsafe", Press et al.,
Numerical Recipes, 3rd ed., section 9.4). It converges in a handful of passes over the logits.
A plain LBFGS on T without a line search, as in many reference implementations, often stops
after barely moving T (see gpleiss/temperature_scaling issues), which is why it is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calibflow.metrics import ArrayLike

# An optimum this close (in log T) to an end of the search range is treated as "on the bound":
# the interior minimum the model needs does not exist in the range.
BOUND_TOL_LOG = 1e-6
# A fit may not raise NLL above NLL(T=1) by more than rounding.
NLL_SLACK = 1e-12


class CalibrationError(RuntimeError):
    """Temperature scaling cannot produce a trustworthy T; the message names the problem and fix."""


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`: the temperature and the calibration-split NLL around it."""

    temperature: float
    nll_before: float  # mean NLL at T = 1
    nll_after: float  # mean NLL at the fitted T
    iterations: int  # Newton/bisection steps (one pass over the logits each)


def _validated(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits ``(N, K)`` and int64 labels ``(N,)`` on the logits' device, or CalibrationError."""
    # Python sequences become float64 directly (torch's default dtype would round them to float32).
    z = logits.detach() if isinstance(logits, torch.Tensor) else torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels).detach()
    if z.ndim != 2:
        raise CalibrationError(
            f"calibration logits must be 2-D (N, K); got shape {tuple(z.shape)}. "
            "Collect the model's raw pre-softmax outputs, one row per calibration image."
        )
    n, k = z.shape
    if n == 0:
        raise CalibrationError(
            "calibration split is empty (0 logits): temperature scaling needs held-out samples. "
            "Give the calibration split a non-zero fraction (split.calibration)."
        )
    if k < 2:
        raise CalibrationError(f"temperature scaling needs at least 2 classes; logits have K={k}.")
    if y.ndim != 1 or y.shape[0] != n:
        raise CalibrationError(
            f"labels shape {tuple(y.shape)} does not match logits shape {tuple(z.shape)}: expected ({n},). "
            "Logits and labels must come from the same calibration split, in the same order."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise CalibrationError(f"labels must be integer class indices; got dtype {y.dtype}.")
    y = y.to(device=z.device, dtype=torch.int64)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        raise CalibrationError(
            f"labels must lie in [0, {k}) for {k}-class logits; got min {lo}, max {hi}. "
            "The label encoding does not match the model's output layer."
        )
    z = z.to(torch.float64)
    finite = torch.isfinite(z)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CalibrationError(
            f"{bad} calibration logits are NaN or infinite: the model diverged or its outputs overflowed "
            "(e.g. in reduced precision). Fix training or collect logits in float32 before calibrating."
        )
    return z, y


def _constant_rows_error() -> CalibrationError:
    return CalibrationError(
        "every row of calibration logits is constant, so softmax(z/T) is uniform for every T and no "
        "temperature is better than another. The model did not learn (check training)."
    )


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_k a_ik b_ik`` per row as a batched matrix product (no (N, K) temporary)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(-1)


class _Objective:
    """Mean NLL of softmax(beta * z) and its beta-derivatives, one pass over the logits per call.

    Logits are shifted by their row maximum once: softmax, ``E_p[z] - z_y`` and ``Var_p[z]`` are
    invariant to a per-row shift, and with ``zc <= 0`` (max exactly 0) ``exp(beta * zc)`` cannot
    overflow and its row sum is >= 1, so ``log`` of it is safe without a logsumexp pass.
    """

    def __init__(self, z: torch.Tensor, y: torch.Tensor) -> None:
        self.zc = z - z.amax(dim=1, keepdim=True)
        self.zc2 = self.zc * self.zc
        self.zc_y = self.zc.gather(1, y[:, None]).squeeze(1)
        # Reused every pass: allocating a fresh (N, K) float64 tensor costs as much as the exp.
        self._buf = torch.empty_like(self.zc)

    def __call__(self, beta: float) -> tuple[float, float, float]:
        """``(NLL, dNLL/dbeta, d2NLL/dbeta2)`` at inverse temperature ``beta``."""
        e = torch.mul(self.zc, beta, out=self._buf).exp_()
        norm = e.sum(dim=1)
        mean_z = _row_dot(e, self.zc) / norm
        # Raw second moment minus squared mean saves a pass. After the max shift the top class sits
        # at 0, so E[zc^2] stays within a small factor of Var when p is sharp, and the cancellation
        # costs a few digits at most; d2 only sizes the Newton step, and the root is set by d1.
        var_z = (_row_dot(e, self.zc2) / norm - mean_z * mean_z).clamp_(min=0.0)
        nll = (norm.log() - beta * self.zc_y).mean()
        d1 = (mean_z - self.zc_y).mean()
        d2 = var_z.mean()
        # One device->host transfer per pass on CUDA.
        nll_v, d1_v, d2_v = torch.stack([nll, d1, d2]).tolist()
        return nll_v, d1_v, d2_v


def _lower_bound_error(min_t: float, max_t: float) -> CalibrationError:
    return CalibrationError(
        f"no interior temperature optimum: NLL keeps falling as T -> {min_t:g}, the lower end of the "
        f"search range [{min_t:g}, {max_t:g}]. Every calibration prediction is correct with a wide "
        "margin, so ever sharper probabilities look better and T is not identifiable. Enlarge the "
        "calibration split (it needs some mistakes) or widen the range by lowering "
        "calibration.min_temperature."
    )


def _upper_bound_error(min_t: float, max_t: float) -> CalibrationError:
    return CalibrationError(
        f"no interior temperature optimum: NLL keeps falling as T -> {max_t:g}, the upper end of the "
        f"search range [{min_t:g}, {max_t:g}]. The logits carry (almost) no information about the "
        "labels on the calibration split, so flatter probabilities always look better. Check that "
        "calibration logits and labels are aligned (same order, same label encoding) and that the "
        "model trained; if it did, widen the range by raising calibration.max_temperature."
    )


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    min_temperature: float = 0.05,
    max_temperature: float = 20.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> TemperatureFit:
    """Fit ``T`` minimising the mean NLL of ``softmax(logits / T)`` on calibration data.

    Solves ``dNLL/dbeta = 0`` (``beta = 1/T``) for ``t = log T`` in
    ``[log min_temperature, log max_temperature]`` with safeguarded Newton (rtsafe) in float64 on
    the logits' device; stops when the Newton step in ``t`` falls below ``tol``. Raises
    :class:`CalibrationError` on bad input (empty, shape mismatch, labels out of range, non-finite
    logits), when the optimum lies on (within 1e-6 in log T of) either end of the range, when the
    solver does not converge in ``max_iter`` steps, or when the result does not lower the NLL.
    """
    min_t, max_t = float(min_temperature), float(max_temperature)
    if not (math.isfinite(min_t) and math.isfinite(max_t) and 0.0 < min_t < max_t):
        raise CalibrationError(
            f"invalid temperature search range [{min_temperature!r}, {max_temperature!r}]: need "
            "0 < calibration.min_temperature < calibration.max_temperature, both finite."
        )
    if not (tol > 0.0 and max_iter >= 1):
        raise CalibrationError(f"need tol > 0 and max_iter >= 1; got tol={tol!r}, max_iter={max_iter!r}")

    z, y = _validated(logits, labels)
    objective = _Objective(z, y)

    def at(t: float) -> tuple[float, float, float]:
        """NLL, g(t) = dNLL/dbeta and dg/dt = -beta * d2NLL/dbeta2, at beta = exp(-t)."""
        beta = math.exp(-t)
        nll, d1, d2 = objective(beta)
        return nll, d1, -beta * d2

    t_lo, t_hi = math.log(min_t), math.log(max_t)
    # g is non-increasing in t (dNLL/dbeta rises with beta = exp(-t)), so its sign at one point
    # says on which side the root lies. g(t_lo) <= 0 means NLL is still falling at the smallest T
    # allowed (it wants T < min_T); g(t_hi) >= 0 means it wants T > max_T. Either way there is no
    # interior minimum. Start at T = 1 when allowed: the usual neighbourhood of the optimum, and it
    # yields NLL(T=1) for free.
    t = 0.0 if t_lo < 0.0 < t_hi else 0.5 * (t_lo + t_hi)
    nll, gt, dgt = at(t)
    nll_before = nll if t == 0.0 else at(0.0)[0]
    if dgt == 0.0 and bool((z.amax(dim=1) == z.amin(dim=1)).all()):
        raise _constant_rows_error()
    if gt > 0.0:
        if at(t_hi)[1] >= 0.0:
            raise _upper_bound_error(min_t, max_t)
        x_pos, x_neg = t, t_hi  # bracket: g(x_pos) > 0 > g(x_neg)
    else:
        # g(t) == 0 exactly also lands here: a stationary point, or a softmax saturated to one-hot
        # on separable data, where NLL is flat at 0 down to T -> 0; the lower bound tells them apart.
        if at(t_lo)[1] <= 0.0:
            raise _lower_bound_error(min_t, max_t)
        x_pos, x_neg = t_lo, t
    dx_old = dx = t_hi - t_lo

    def small_newton_step(gt: float, dgt: float) -> bool:
        # Quadratic convergence: a next step below tol means t already is within ~tol of the root.
        return gt == 0.0 or (dgt != 0.0 and abs(gt / dgt) < tol)

    converged = small_newton_step(gt, dgt)
    iterations = 0
    while not converged and iterations < max_iter:
        iterations += 1
        newton_leaves_bracket = ((t - x_neg) * dgt - gt) * ((t - x_pos) * dgt - gt) > 0.0
        newton_too_slow = abs(2.0 * gt) > abs(dx_old * dgt)
        if dgt == 0.0 or newton_leaves_bracket or newton_too_slow:
            dx_old, dx = dx, 0.5 * (x_neg - x_pos)
            t = x_pos + dx
        else:
            dx_old, dx = dx, gt / dgt
            t = t - dx
        nll, gt, dgt = at(t)
        if abs(dx) < tol or small_newton_step(gt, dgt):
            converged = True
        elif gt > 0.0:
            x_pos = t
        else:
            x_neg = t
    if not converged:
        raise CalibrationError(
            f"temperature fit did not converge in {max_iter} steps (last T={math.exp(t):.6g}, step "
            f"{abs(dx):.3g} in log T > tol {tol:g}). Raise max_iter or tol."
        )

    if t - t_lo <= BOUND_TOL_LOG:
        raise _lower_bound_error(min_t, max_t)
    if t_hi - t <= BOUND_TOL_LOG:
        raise _upper_bound_error(min_t, max_t)
    temperature = math.exp(t)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise CalibrationError(f"fitted temperature {temperature!r} is not a finite positive number.")
    if not (math.isfinite(nll) and nll <= nll_before + NLL_SLACK):
        raise CalibrationError(
            f"fitted T={temperature:.6g} gives NLL {nll:.12g} > NLL(T=1) {nll_before:.12g}; a fit that does "
            "not lower NLL is wrong. Report this with the calibration logits."
        )
    return TemperatureFit(
        temperature=float(temperature),
        nll_before=float(nll_before),
        nll_after=float(nll),
        iterations=iterations,
    )
