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
Numerical Recipes, 3rd ed., section 9.4). A plain LBFGS on T without a line search, as in many
reference implementations, often stops after barely moving T (see gpleiss/temperature_scaling
issues), which is why it is not used.

Speed. Each evaluation of (L, dL/dbeta, d2L/dbeta2) is one pass over the N x K logits, and its
cost is the N * K exponentials. Three things keep the number and the cost of the passes down:

* Warm start. On large splits (``WARM_START_MIN_ROWS``) the solver first fits a strided
  subsample of about ``WARM_START_ROWS`` rows: its root is within the subsample's sampling error
  (a few 1e-2 in log T) of the full-data root, for a fraction of one full pass.
* From there, Halley's method (Newton plus the third derivative, which one more multiply-sum per
  pass gives: d3L/dbeta3 is the mean third central moment of z under p) converges cubically,
  1e-2 -> 1e-6 -> 1e-18 in log T. Once its step is below ``ACCEPT_STEP`` that step is applied
  without another pass, and the NLL there follows from the second-order Taylor expansion at the
  last point, to O(step^3). So a large split costs two full passes, plus one at T = 1 for the
  NLL before calibration. A step that leaves the range, does not shrink, or meets a point where
  L is not strictly convex hands over to the bracketed solver from scratch, which also owns the
  "optimum on a bound" errors.
* Each pass walks the rows in blocks of about ``BLOCK_ELEMENTS`` values that stay in the CPU
  cache, shifting each block by its row maxima on the fly: no N x K float64 copy of the logits
  is ever made, and a float32 input is widened block by block.

Everything is float64 (the input may be float32, float16 or bfloat16); on a CUDA tensor a block
is the whole split. benchmarks/calibration_speed.py measures the fit against netcal's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calibflow.metrics import ArrayLike
from calibflow.errors import CalibrationError

# The search range for T (params.yaml's calibration.min_temperature / max_temperature).
DEFAULT_MIN_TEMPERATURE, DEFAULT_MAX_TEMPERATURE = 0.05, 20.0

# An optimum this close (in log T) to an end of the search range is treated as "on the bound":
# the interior minimum the model needs does not exist in the range.
BOUND_TOL_LOG = 1e-6
# A fit may not raise NLL above NLL(T=1) by more than rounding.
NLL_SLACK = 1e-12
# Splits with at least this many rows start Halley's method from a subsample's fit (see the module
# docstring); smaller ones are cheap enough (< 2M values) to solve from T = 1 directly.
WARM_START_MIN_ROWS = 16_384
# Rows in the warm-start subsample (about): its fitted log T is within a few 1e-2 of the full
# data's, close enough for two Halley steps.
WARM_START_ROWS = 2_048
# The subsample's fit only needs to beat its own sampling error (~1e-2 in log T).
WARM_START_TOL = 1e-4
# A full-data Halley step this small (in log T) is applied without evaluating the next point: the
# error it leaves is of the order of its cube.
ACCEPT_STEP = 1e-5
# Full-data Halley steps the warm-started solve may take before handing over to the bracketed one.
MAX_WARM_STEPS = 8
# Values per block of a pass on the CPU: two float64 buffers of 3.2 MB that stay in cache. On 50,000
# x 100 logits (2-core x86) a pass took 10 ms in blocks of 4,096 rows, 11-13 ms in blocks of 1,024
# or 2,048 rows, and 14 ms (float64 input) or 31 ms (float32 input) as one whole-array pass.
BLOCK_ELEMENTS = 409_600


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`: the temperature and the calibration-split NLL around it."""

    temperature: float
    nll_before: float  # mean NLL at T = 1
    nll_after: float  # mean NLL at the fitted T
    iterations: int  # solver steps on the full split (Halley, Newton or bisection; one pass each)


def _checked(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` in their own floating dtype, int64 labels ``(N,)`` on the logits' device,
    and the logits' per-row minima and maxima; or CalibrationError naming the problem."""
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
    lo, hi = torch.aminmax(y)
    if int(lo) < 0 or int(hi) >= k:
        raise CalibrationError(
            f"labels must lie in [0, {k}) for {k}-class logits; got min {int(lo)}, max {int(hi)}. "
            "The label encoding does not match the model's output layer."
        )
    if not z.is_floating_point():
        z = z.to(torch.float64)
    # Row extremes are NaN or infinite exactly when a row holds a NaN or an infinity (min and max
    # propagate NaN), so one cheap reduction replaces an N x K isfinite mask.
    # (Two reductions: torch.aminmax measured 3.5x slower than amax plus amin on the CPU.)
    row_min, row_max = z.amin(dim=1), z.amax(dim=1)
    if not bool(torch.isfinite(row_min).all() & torch.isfinite(row_max).all()):
        bad = int((~torch.isfinite(z)).sum())
        raise CalibrationError(
            f"{bad} calibration logits are NaN or infinite: the model diverged or its outputs overflowed "
            "(e.g. in reduced precision). Fix training or collect logits in float32 before calibrating."
        )
    return z, y, row_min, row_max


def _validated(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits ``(N, K)`` and int64 labels ``(N,)`` on the logits' device, or CalibrationError."""
    z, y, _, _ = _checked(logits, labels)
    return z.to(torch.float64), y


def _constant_rows_error() -> CalibrationError:
    return CalibrationError(
        "every row of calibration logits is constant, so softmax(z/T) is uniform for every T and no "
        "temperature is better than another. The model did not learn (check training)."
    )


class _Objective:
    """Mean NLL of softmax(beta * z) and its beta-derivatives, one blocked pass over the logits per call.

    Each block is shifted by its rows' maxima (``zc = z - max``): softmax, ``E_p[z] - z_y`` and the
    central moments of z are invariant to a per-row shift, and with ``zc <= 0`` (max exactly 0)
    ``exp(beta * zc)`` cannot overflow and its row sum is >= 1, so ``log`` of it is safe without a
    logsumexp pass.
    """

    def __init__(
        self, z: torch.Tensor, y: torch.Tensor, row_max: torch.Tensor, targets: torch.Tensor | None = None
    ) -> None:
        n, k = z.shape
        self.z = z
        self.row_max = row_max.to(torch.float64).unsqueeze(1)
        if targets is None:
            zc_y = z.gather(1, y[:, None]).squeeze(1).to(torch.float64) - self.row_max.squeeze(1)
        else:
            # Against a distribution q per row, -sum_k q_k log p_k = log sum exp(beta zc) - beta sum_k q_k zc_k
            # (sum_k q_k = 1): the same objective with q's mean of zc in place of zc at the label.
            zc_y = (targets.to(torch.float64) * (z.to(torch.float64) - self.row_max)).sum(dim=1)
        self.mean_zc_y = float(zc_y.mean())  # the only use of the labels: the linear term of the NLL
        self.block_rows = n if z.device.type != "cpu" else max(1, min(n, BLOCK_ELEMENTS // k))
        f64 = {"dtype": torch.float64, "device": z.device}
        # Reused by every block of every pass: allocating (and page-faulting) fresh buffers costs
        # as much as the exponentials themselves.
        self._u = torch.empty(self.block_rows, k, **f64)
        self._e = torch.empty(self.block_rows, k, **f64)
        self._log_norm = torch.empty(n, **f64)
        self._mean = torch.empty(n, **f64)
        self._second = torch.empty(n, **f64)
        self._third = torch.empty(n, **f64)

    def _blocks(self, beta: float):
        """Yield ``(rows, u, e)`` per block: ``u = beta * zc`` and ``e = exp(u)`` in the buffers."""
        n = self.z.shape[0]
        for start in range(0, n, self.block_rows):
            stop = min(n, start + self.block_rows)
            m = stop - start
            # Shift, then scale: the row maximum becomes exactly 0. (A fused beta * z - beta * max
            # is one op cheaper, but its FMA leaves the maximum at +-1 ulp, and on a saturated
            # softmax that rounding alone decides the sign of dNLL/dbeta.)
            u = torch.sub(self.z[start:stop], self.row_max[start:stop], out=self._u[:m]).mul_(beta)
            e = torch.exp(u, out=self._e[:m])
            yield slice(start, stop), u, e

    def nll(self, beta: float) -> float:
        """Mean NLL at inverse temperature ``beta`` (one pass, no derivatives)."""
        for rows, _, e in self._blocks(beta):
            torch.sum(e, dim=1, out=self._log_norm[rows])
        return float(self._log_norm.log_().mean()) - beta * self.mean_zc_y

    def __call__(self, beta: float, third: bool = False) -> tuple[float, ...]:
        """``(NLL, dNLL/dbeta, d2NLL/dbeta2)`` at inverse temperature ``beta``, and with ``third``
        also ``d3NLL/dbeta3`` (the mean third central moment of z under p; one more multiply-sum)."""
        norm, mean, second, cube = self._log_norm, self._mean, self._second, self._third
        for rows, u, e in self._blocks(beta):
            torch.sum(e, dim=1, out=norm[rows])
            e.mul_(u)
            torch.sum(e, dim=1, out=mean[rows])
            e.mul_(u)
            torch.sum(e, dim=1, out=second[rows])
            if third:
                e.mul_(u)
                torch.sum(e, dim=1, out=cube[rows])
        # The sums are of e * u^j with u = beta * zc: rescale them to the moments E_p[zc^j].
        mean.div_(norm).div_(beta)
        second.div_(norm).div_(beta * beta)
        # Central moments from raw ones save passes. After the max shift the top class sits at 0,
        # so E[zc^2] stays within a small factor of Var when p is sharp, and the cancellation costs a
        # few digits at most; d2 and d3 only size the step, and the root is set by d1 alone.
        mean_sq = mean * mean
        var = (second - mean_sq).clamp_(min=0.0)
        if third:
            # E[(zc - mu)^3] = E[zc^3] - 3 mu E[zc^2] + 2 mu^3
            cube.div_(norm).div_(beta**3)
            third_central = (cube - 3.0 * mean * second + 2.0 * mean * mean_sq).mean()
        terms = [norm.log_().mean() - beta * self.mean_zc_y, mean.mean() - self.mean_zc_y, var.mean()]
        if third:
            terms.append(third_central)
        # One device->host transfer per pass on CUDA.
        return tuple(torch.stack(terms).tolist())

    def at(self, t: float) -> tuple[float, float, float]:
        """NLL, g(t) = dNLL/dbeta and g'(t) = -beta * d2NLL/dbeta2, at beta = exp(-t)."""
        beta = math.exp(-t)
        nll, d1, d2 = self(beta)
        return nll, d1, -beta * d2

    def at_with_curvature(self, t: float) -> tuple[float, float, float, float]:
        """As :meth:`at`, plus g''(t) = beta * d2NLL/dbeta2 + beta^2 * d3NLL/dbeta3."""
        beta = math.exp(-t)
        nll, d1, d2, d3 = self(beta, third=True)
        return nll, d1, -beta * d2, beta * d2 + beta * beta * d3


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


@dataclass(frozen=True)
class _Root:
    t: float  # log T
    nll: float  # mean NLL at t
    iterations: int  # steps taken, as in TemperatureFit.iterations
    nll_at_one: float | None  # NLL(T=1) when the solve evaluated it on the way


def _bracketed_newton(objective: _Objective, t_lo: float, t_hi: float, tol: float, max_iter: int) -> _Root:
    """Root of g in ``[t_lo, t_hi]`` by safeguarded Newton (rtsafe), or CalibrationError.

    Raises the bound errors when g does not change sign inside the range, and a convergence error
    after ``max_iter`` steps; stops when the Newton step in ``t`` falls below ``tol``.
    """
    min_t, max_t = math.exp(t_lo), math.exp(t_hi)
    # g is non-increasing in t (dNLL/dbeta rises with beta = exp(-t)), so its sign at one point
    # says on which side the root lies. g(t_lo) <= 0 means NLL is still falling at the smallest T
    # allowed (it wants T < min_T); g(t_hi) >= 0 means it wants T > max_T. Either way there is no
    # interior minimum. Start at T = 1 when allowed: the usual neighbourhood of the optimum, and it
    # yields NLL(T=1) for free.
    t = 0.0 if t_lo < 0.0 < t_hi else 0.5 * (t_lo + t_hi)
    nll, gt, dgt = objective.at(t)
    nll_at_one = nll if t == 0.0 else None
    if gt > 0.0:
        if objective.at(t_hi)[1] >= 0.0:
            raise _upper_bound_error(min_t, max_t)
        x_pos, x_neg = t, t_hi  # bracket: g(x_pos) > 0 > g(x_neg)
    else:
        # g(t) == 0 exactly also lands here: a stationary point, or a softmax saturated to one-hot
        # on separable data, where NLL is flat at 0 down to T -> 0; the lower bound tells them apart.
        if objective.at(t_lo)[1] <= 0.0:
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
        nll, gt, dgt = objective.at(t)
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
    return _Root(t=t, nll=nll, iterations=iterations, nll_at_one=nll_at_one)


def _warm_start(
    z: torch.Tensor,
    y: torch.Tensor,
    row_max: torch.Tensor,
    t_lo: float,
    t_hi: float,
    targets: torch.Tensor | None = None,
) -> float | None:
    """log T fitted on every ``N // WARM_START_ROWS``-th row, or None when that fit fails."""
    rows = slice(None, None, max(2, z.shape[0] // WARM_START_ROWS))
    # A contiguous copy (N / stride rows) makes the subsample's passes as cheap per row as the full ones.
    subsample = _Objective(
        z[rows].contiguous(), y[rows], row_max[rows], targets[rows].contiguous() if targets is not None else None
    )
    try:
        return _bracketed_newton(subsample, t_lo, t_hi, WARM_START_TOL, 100).t
    except CalibrationError:
        # e.g. a subsample with no mistakes: the full data decides, from scratch.
        return None


def _halley_from(objective: _Objective, t: float, t_lo: float, t_hi: float, max_steps: int) -> _Root | None:
    """Halley's method from a close start; None as soon as it stops behaving like a converging one.

    Halley's step ``h = dx / (1 - dx g'' / (2 g'))`` with the Newton step ``dx = g / g'`` converges
    cubically (Press et al., Numerical Recipes, 3rd ed., section 9.4), so from a start ~1e-2 off the
    second step is ~1e-6 and leaves ~1e-15: it is accepted once below ACCEPT_STEP, applied without
    another pass. Gives up, for the bracketed solver to take over, when a step leaves the range
    (with the bound margin), does not shrink, or meets a point where NLL is not strictly convex in
    beta.
    """
    previous_step = math.inf
    for step_number in range(1, max_steps + 1):
        nll, g, dg, d2g = objective.at_with_curvature(t)
        if not (dg < 0.0 and math.isfinite(g) and math.isfinite(d2g) and math.isfinite(nll)):
            return None
        dx = g / dg
        correction = 1.0 - 0.5 * dx * d2g / dg
        # Far from the root the cubic term can mislead: then take the plain Newton step.
        h = dx / correction if 0.5 <= correction <= 2.0 else dx
        t_next = t - h
        if abs(h) >= 0.5 * previous_step or not (t_lo + BOUND_TOL_LOG < t_next < t_hi - BOUND_TOL_LOG):
            return None
        if abs(h) < ACCEPT_STEP:
            # Second-order Taylor of NLL in t, error O(h^3) (~1e-15): with NLL'(t) = -beta g and
            # NLL''(t) = beta (g - g'), NLL(t - h) = NLL(t) + beta g h + (1/2) beta (g - g') h^2.
            beta = math.exp(-t)
            nll_next = nll + beta * g * h + 0.5 * beta * (g - dg) * h * h
            return _Root(t=t_next, nll=nll_next, iterations=step_number, nll_at_one=None)
        previous_step, t = abs(h), t_next
    return None


def _checked_targets(targets: ArrayLike, z: torch.Tensor) -> torch.Tensor:
    """float64 distributions (N, K) on the logits' device, or CalibrationError."""
    q = torch.as_tensor(targets).detach().to(device=z.device, dtype=torch.float64)
    if q.shape != z.shape:
        raise CalibrationError(f"targets shape {tuple(q.shape)} does not match logits shape {tuple(z.shape)}")
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()) or float((q.sum(dim=1) - 1).abs().max()) > 1e-4:
        raise CalibrationError("targets must be distributions: finite, non-negative rows that sum to 1")
    return q


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    min_temperature: float = DEFAULT_MIN_TEMPERATURE,
    max_temperature: float = DEFAULT_MAX_TEMPERATURE,
    tol: float = 1e-10,
    max_iter: int = 100,
    *,
    targets: ArrayLike | None = None,
) -> TemperatureFit:
    """Fit ``T`` minimising the mean NLL of ``softmax(logits / T)`` on calibration data; with
    ``targets`` (N, K), each row a distribution over the classes (soft labels), the mean
    cross-entropy ``-sum_k q_k log softmax(z / T)_k`` instead, and NLL below means that.

    Solves ``dNLL/dbeta = 0`` (``beta = 1/T``) for ``t = log T`` in
    ``[log min_temperature, log max_temperature]`` in float64 on the logits' device: on splits of
    at least ``WARM_START_MIN_ROWS`` rows by Halley's method from a subsample's fit, otherwise (and whenever
    that does not converge cleanly) by safeguarded Newton (rtsafe) from T = 1, which stops when the
    Newton step in ``t`` falls below ``tol``. Raises :class:`CalibrationError` on bad input (empty,
    shape mismatch, labels out of range, non-finite logits), when the optimum lies on (within 1e-6
    in log T of) either end of the range, when the solver does not converge in ``max_iter`` steps,
    or when the result does not lower the NLL.
    """
    min_t, max_t = float(min_temperature), float(max_temperature)
    if not (math.isfinite(min_t) and math.isfinite(max_t) and 0.0 < min_t < max_t):
        raise CalibrationError(
            f"invalid temperature search range [{min_temperature!r}, {max_temperature!r}]: need "
            "0 < calibration.min_temperature < calibration.max_temperature, both finite."
        )
    if not (tol > 0.0 and max_iter >= 1):
        raise CalibrationError(f"need tol > 0 and max_iter >= 1; got tol={tol!r}, max_iter={max_iter!r}")

    z, y, row_min, row_max = _checked(logits, labels)
    if bool((row_min == row_max).all()):
        raise _constant_rows_error()
    q = _checked_targets(targets, z) if targets is not None else None
    objective = _Objective(z, y, row_max, q)
    t_lo, t_hi = math.log(min_t), math.log(max_t)

    root = None
    if z.shape[0] >= WARM_START_MIN_ROWS:
        start = _warm_start(z, y, row_max, t_lo, t_hi, q)
        if start is not None:
            root = _halley_from(objective, start, t_lo, t_hi, min(max_iter, MAX_WARM_STEPS))
    if root is None:
        root = _bracketed_newton(objective, t_lo, t_hi, tol, max_iter)
    nll_before = root.nll_at_one if root.nll_at_one is not None else objective.nll(1.0)

    temperature = math.exp(root.t)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise CalibrationError(f"fitted temperature {temperature!r} is not a finite positive number.")
    if not (math.isfinite(root.nll) and root.nll <= nll_before + NLL_SLACK):
        raise CalibrationError(
            f"fitted T={temperature:.6g} gives NLL {root.nll:.12g} > NLL(T=1) {nll_before:.12g}; a fit that "
            "does not lower NLL is wrong. Report this with the calibration logits."
        )
    return TemperatureFit(
        temperature=float(temperature),
        nll_before=float(nll_before),
        nll_after=float(root.nll),
        iterations=root.iterations,
    )
