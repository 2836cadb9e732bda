"""One-sided confidence bounds that the promotion gates read, each derived in docs/gates.md.

A gate passes when a bound at level ``confidence`` clears its threshold, so the gate's
false-promotion rate is at most ``1 - confidence`` wherever the bound covers. Every bound here is
built for the cases where a bootstrap of a plug-in estimate fails (Kumar, Liang & Ma 2019; issue
"gates that keep their stated confidence"):

- accuracy: Clopper-Pearson, exact for a binomial count (no "few errors" trap);
- accuracy drop against the champion: a score test on the paired 2x2 table (Tango 1998, Nam
  1997), variance taken at the null, continuity-corrected;
- NLL: the mean of the per-image losses with Hall's (1992) skewness-removing transformation
  of the studentized mean (NLL is right-skewed: rare confident errors are large losses);
- calibration error (binned ECE or smooth ECE): an intersection-union test (Berger 1982) over
  the sign patterns of the per-bin residuals, each a linear functional, with a score variance
  taken at the null (Wilson 1927, generalised) and a continuity correction;
- calibration-error increase against the champion: the smaller of two valid upper bounds, each
  at half the error rate: the L1 distance between the two models' residual profiles (which
  bounds |ECE(a) - ECE(b)| by the triangle inequality, and is tight when the models are alike),
  and the candidate's upper bound minus a cross-fitted lower bound of the champion's error
  (tight when the candidate is much better calibrated than the champion).

Notation: n test images; c_i the top-label confidence; y_i = 1 when the top label is right;
r_i = c_i - y_i, the residual whose conditional mean given c_i is the calibration gap at c_i.
The library functions take numpy arrays; nothing here imports torch, so the benchmark and
`calibflow gate plan` can call them thousands of times.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from calibflow.metrics.reliability import DEFAULT_N_BINS

CONTINUITY = 0.5  # in units of 1/n: half the lattice step of a mean of {0, 1} outcomes


@dataclass(frozen=True)
class Bound:
    estimate: float  # point estimate, for the report; the gate reads `bound`
    bound: float  # one-sided confidence bound: upper for "at most" gates, lower for "at least"
    method: str  # what produced the bound, for the report


def z_quantile(confidence: float) -> float:
    return float(stats.norm.ppf(confidence))


def _first_crossing(
    passes: Callable[[float], bool], low: float, high: float, grid: int = 64, tol: float = 1e-7
) -> float:
    """Smallest x in [low, high] with passes(x), to `tol`; `high` when none passes before it.

    A coarse grid first, so that a test that is not monotone in x still gives its first crossing
    rather than whichever crossing a bisection happens to meet."""
    if passes(low):
        return low
    xs = np.linspace(low, high, grid + 1)
    previous = low
    for x in xs[1:]:
        if passes(float(x)):
            lo, hi = previous, float(x)
            while hi - lo > tol:
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if passes(mid) else (mid, hi)
            return hi
        previous = float(x)
    return high


def betting_upper_bound(values: np.ndarray, confidence: float, *, low: float, high: float, cap: float = 0.95) -> float:
    """Upper bound of E[x] at `confidence` for independent x_i known to lie in [low, high], by
    betting (Waudby-Smith & Ramdas 2023, predictable plug-in bets).

    For a candidate mean m a bettor stakes lambda_i (m - x_i) on each value in turn, lambda_i
    chosen from the values before it only; when E[x] >= m the wealth is a non-negative
    supermartingale, so by Ville's inequality it reaches 1 / alpha with probability at most alpha.
    The bound is the smallest m whose wealth reaches 1 / alpha. Exact for every distribution on
    [low, high] at every n (no normal approximation): a sample that misses rare large values keeps
    its bound, because the bet, not a standard deviation, carries them (the trap a studentized
    bound falls into). `cap` < 1 keeps a bet from staking everything on one value: 720 zeros in
    [-2, 2] get 0.0092, where no valid bound can go below 2 (1 - 0.05^(1/720)) = 0.0083. The values are used in the order given: callers shuffle them with a fixed seed."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return high
    width = high - low
    y = np.clip((x - low) / width, 0.0, 1.0)
    log_target = math.log(1.0 / (1.0 - confidence))
    steps = np.arange(1, n + 1)
    running_mean = (0.5 + np.cumsum(y)) / (steps + 1)
    mean_before = np.concatenate(([0.5], running_mean[:-1]))
    running_var = (0.25 + np.cumsum((y - mean_before) ** 2)) / (steps + 1)
    var_before = np.concatenate(([0.25], running_var[:-1]))
    stake = np.sqrt(2.0 * log_target / (n * var_before))

    def rejects(m: float) -> bool:
        bets = np.minimum(stake, cap / (1.0 - m)) if m < 1.0 else stake
        return float(np.max(np.cumsum(np.log1p(bets * (m - y))))) >= log_target

    lo, hi = float(y.mean()), 1.0
    if rejects(lo):
        return low + width * lo
    while hi - lo > 1e-7:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if rejects(mid) else (mid, hi)
    return low + width * hi


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


def clopper_pearson_lower(successes: int, n: int, level: float) -> float:
    """Exact one-sided lower bound at `level` of a binomial rate from `successes` of n; 0 when
    there is nothing to bound (no success, or n = 0)."""
    if n == 0 or successes == 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - level, successes, n - successes + 1))


def clopper_pearson_upper(failures: int, n: int, level: float) -> float:
    """Exact one-sided upper bound at `level` of a binomial rate from `failures` of n; 1 when
    every outcome failed or n = 0."""
    if failures >= n:
        return 1.0
    return float(stats.beta.ppf(level, failures + 1, n - failures))


def accuracy_lower_bound(correct: np.ndarray, confidence: float) -> Bound:
    """Clopper-Pearson lower bound of the accuracy: exact for n independent Bernoulli outcomes."""
    n, k = int(correct.size), int(np.sum(correct))
    return Bound(k / n, clopper_pearson_lower(k, n, confidence), "clopper-pearson")


def _paired_null_p01(n10: int, n01: int, n: int, delta: float) -> float:
    """Maximum-likelihood p01 of the paired 2x2 table under p10 - p01 = delta (Tango 1998).

    The likelihood n10 log(p01 + delta) + n01 log p01 + n00 log(1 - 2 p01 - delta) has its
    stationary point at a root of 2n q^2 - B q - C = 0 (derived in docs/gates.md); the feasible
    interval is q in [max(0, -delta), (1 - delta) / 2]."""
    n00 = n - n10 - n01
    b = n10 * (1 - delta) + n01 * (1 - 3 * delta) - 2 * n00 * delta
    c = n01 * delta * (1 - delta)
    lo, hi = max(0.0, -delta), (1.0 - delta) / 2.0
    disc = max(b * b + 8.0 * n * c, 0.0)
    candidates = [lo, hi] + [(b + sign * math.sqrt(disc)) / (4.0 * n) for sign in (1.0, -1.0)]

    def loglik(q: float) -> float:
        total = 0.0
        for count, p in ((n10, q + delta), (n01, q), (n00, 1.0 - 2.0 * q - delta)):
            if count:
                if p <= 0.0:
                    return -math.inf
                total += count * math.log(p)
        return total

    feasible = [min(max(q, lo), hi) for q in candidates]
    return max(feasible, key=loglik)


def accuracy_drop_upper_bound(champion_correct: np.ndarray, candidate_correct: np.ndarray, confidence: float) -> Bound:
    """Upper bound of accuracy(champion) - accuracy(candidate) on the same images.

    Score-test inversion on the paired table: H0 "drop >= delta" is rejected when
    (delta - observed - 0.5/n) / sqrt(V0(delta)) >= z, with V0 the variance of the mean paired
    difference at the null's maximum-likelihood cell probabilities. With no discordant pairs the
    variance at the null is delta (1 - delta) / n, not 0: the trap a bootstrap falls into."""
    n = int(champion_correct.size)
    n10 = int(np.sum(champion_correct & ~candidate_correct))  # champion right, candidate wrong
    n01 = int(np.sum(~champion_correct & candidate_correct))
    observed = (n10 - n01) / n
    z = z_quantile(confidence)

    def passes(delta: float) -> bool:
        q = _paired_null_p01(n10, n01, n, delta)
        variance = max((2.0 * q + delta - delta * delta) / n, 1e-300)
        return (delta - observed - CONTINUITY / n) >= z * math.sqrt(variance)

    return Bound(observed, _first_crossing(passes, observed, 1.0), "paired score (Tango)")


# ---------------------------------------------------------------------------------------------
# NLL (a mean of non-negative, right-skewed losses)
# ---------------------------------------------------------------------------------------------


def nll_upper_bound(loss: np.ndarray, confidence: float, max_loss: float, seed: int = 0) -> Bound:
    """Upper bound of the expected NLL: a betting bound of the mean loss over [0, max_loss].

    Each loss is at most max_loss = -log(eps) (probabilities are clipped at eps, as
    calibflow.metrics does), so the bound holds for every distribution of losses, heavy tails
    included: a quarter of the errors at probability 1e-12 (a loss of 27.6 where the others are
    near 2) is charged by how often such a loss can go unseen, not by the spread of the sample.
    A skew-corrected t bound (Hall 1992) of the error's excess loss passed a model on its limit
    9.5% of the time there (issue 23); the betting bound is exact at every n."""
    x = np.asarray(loss, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(x.size)
    bound = betting_upper_bound(x[order], confidence, low=0.0, high=max_loss)
    return Bound(float(x.mean()), bound, "betting (Waudby-Smith & Ramdas), losses in [0, -log eps]")


# ---------------------------------------------------------------------------------------------
# Calibration error: binned (equal-width) or smooth (relplot's kernel), as linear functionals
# ---------------------------------------------------------------------------------------------


class ResidualProfile:
    """A linear map from per-image values to a profile over bins or grid points, with its adjoint.

    The calibration error is ||P(r)||_1 / D: for equal-width bins P sums r_i per bin and D = n
    (plug-in binned ECE); for smooth ECE P is relplot's reflected-Gaussian smoothing of r_i and D
    its smoothed density mass. For a sign pattern s, <s, P(r)> / D = mean(m_i r_i) with
    m = (n / D) P^T s: that per-image weight is what the bounds' variances are computed from."""

    def project(self, conf: np.ndarray, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def adjoint(self, conf: np.ndarray, signs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def mass(self, conf: np.ndarray) -> float:
        raise NotImplementedError

    def error(self, conf: np.ndarray, residual: np.ndarray) -> float:
        return float(np.abs(self.project(conf, residual)).sum() / self.mass(conf))

    def weights(self, conf: np.ndarray, signs: np.ndarray) -> np.ndarray:
        return self.adjoint(conf, signs) * (conf.size / self.mass(conf))


class EqualWidthBins(ResidualProfile):
    """Bins (lo, hi] of width 1/n_bins, a confidence of exactly 0 in bin 0 (calibflow.metrics')."""

    def __init__(self, n_bins: int) -> None:
        self.n_bins = int(n_bins)
        self.name = f"ECE ({self.n_bins} equal-width bins)"

    def index(self, conf: np.ndarray) -> np.ndarray:
        # ceil(c * B) - 1 with each edge k / B correctly rounded, as calibflow.metrics.bin_indices
        edges = np.arange(self.n_bins + 1, dtype=np.float64) / self.n_bins
        return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, self.n_bins - 1)

    def project(self, conf, values):
        return np.bincount(self.index(conf), weights=values, minlength=self.n_bins)

    def adjoint(self, conf, signs):
        return signs[self.index(conf)]

    def mass(self, conf):
        return float(conf.size)


class SmoothKernel(ResidualProfile):
    """relplot's smooth ECE at bandwidth sigma (Blasiok & Nakkiran 2023) as a linear map.

    relplot.metrics.smooth_ece computes sum_t |K r|_t / sum_t (K 1 + eps)_t with K = interpolate
    o reflected-convolve o round-to-grid; we call the same relplot objects for K and write only
    K's adjoint (each of the three steps is a sparse linear map), which the variance needs."""

    def __init__(self, sigma: float) -> None:
        from relplot import config as relplot_config
        from relplot.kernels import ReflectedGaussianKernel

        self.sigma = float(sigma)
        self.kernel = ReflectedGaussianKernel(self.sigma)
        self.t = np.linspace(0, 1, max(round(10 / self.sigma), relplot_config.smECE_mesh_pts))
        self.grid = max(2000, round(20 / self.sigma)) // 2 + 1  # relplot's GaussianKernel.apply
        self.name = f"smooth ECE (sigma {self.sigma:.4f})"
        self._masses: dict[bytes, float] = {}

    def project(self, conf, values):
        return self.kernel.apply(conf, values, self.t)

    def mass(self, conf):
        # a convolution over the whole grid, which the bounds ask of the same confidences once per
        # weight vector (the champion comparison: once per block): computed once per array
        key = _digest(conf)
        if key not in self._masses:
            eps = 0.0001  # relplot's BaseKernelMixin.smooth adds it to the density
            self._masses[key] = float(np.sum(self.kernel.apply(conf, np.ones_like(conf), self.t) + eps))
        return self._masses[key]

    def adjoint(self, conf, signs):
        e = self.grid
        # interpolate(t, y)^T
        inds = (self.t * (e - 1)).astype(int).clip(0, e - 2)
        frac = (self.t - inds / (e - 1)) * (e - 1)
        g = np.zeros(e)
        np.add.at(g, inds, signs * (1 - frac))
        np.add.at(g, inds + 1, signs * frac)
        # reflected 'valid' convolution, sliced, ^T: a full convolution with the reversed kernel,
        # then the two mirrored copies folded back onto the grid
        kernel = self.kernel.kernel_ev(e)
        padded = np.zeros(2 * e - 1)
        padded[e // 2 : e // 2 + e] = g
        extended = np.convolve(padded, kernel[::-1], "full")
        v = extended[e - 1 : 2 * e - 1].copy()
        v[1:e] += extended[0 : e - 1][::-1]
        v[0 : e - 1] += extended[2 * e - 1 :][::-1]
        # smooth_round_to_grid^T
        bins = (conf * (e - 1)).astype(int).clip(0, e - 2)
        frac_c = conf * (e - 1) - bins
        return v[bins] * (1 - frac_c) + v[bins + 1] * frac_c


def _digest(*parts: np.ndarray | object) -> bytes:
    """A key for arrays' exact values, dtypes and shapes (and any other parts, by repr): equal
    keys, the same numbers in the same layout."""
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        if isinstance(part, np.ndarray):
            values = np.ascontiguousarray(part)
            digest.update(f"{values.dtype.str}{values.shape};".encode())
            digest.update(memoryview(values).cast("B"))
        else:
            digest.update(f"{part!r};".encode())
    return digest.digest()


# relplot's bandwidth search costs milliseconds a call, and one gate evaluation asks for the same
# arrays' smooth ECE up to three times (the absolute gate, then the candidate and, for an identical
# retrain, the champion at the shared bandwidth): the gate-power simulation does that hundreds of
# times. Keyed by a digest of the arrays and relplot's settings, so a hit is the same answer.
_SMOOTH_ECE_MEMO: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
_SMOOTH_ECE_MEMO_SIZE = 4
_SMOOTH_ECE_LOCK = threading.Lock()


def smooth_ece(conf: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """relplot's smooth ECE with its automatic bandwidth: (value, sigma)."""
    import relplot

    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    # relplot reads its mesh and scaling from its module config on every call
    key = _digest(conf, correct, relplot.config.smECE_mesh_pts, relplot.config.use_logit_scaling)
    with _SMOOTH_ECE_LOCK:
        if key in _SMOOTH_ECE_MEMO:
            _SMOOTH_ECE_MEMO.move_to_end(key)
            return _SMOOTH_ECE_MEMO[key]
    value, sigma = relplot.smECE(conf, correct, return_width=True)
    answer = float(value), float(sigma)
    with _SMOOTH_ECE_LOCK:
        _SMOOTH_ECE_MEMO[key] = answer
        while len(_SMOOTH_ECE_MEMO) > _SMOOTH_ECE_MEMO_SIZE:
            _SMOOTH_ECE_MEMO.popitem(last=False)
    return answer


def _signs(profile: np.ndarray) -> np.ndarray:
    return np.where(profile >= 0.0, 1.0, -1.0)


def _null_accuracy(conf: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """Per-image accuracy the null model starts from: its bin's accuracy, shrunk by Jeffreys'
    prior (k + 1/2) / (n + 1) so that a bin with no errors still has a variance."""
    bins = EqualWidthBins(n_bins)
    idx = bins.index(conf)
    count = np.bincount(idx, minlength=n_bins)
    right = np.bincount(idx, weights=correct, minlength=n_bins)
    return ((right + 0.5) / (count + 1.0))[idx]


def calibration_error_upper_bound(
    conf: np.ndarray, correct: np.ndarray, profile: ResidualProfile, confidence: float
) -> Bound:
    """Upper bound of the calibration error ||P(r)||_1 / D of one model.

    The error is the largest of the linear functionals L_s = <s, P(r)> / D over sign patterns s,
    so "error >= eps" is the union over s of "L_s >= eps": an intersection-union test (Berger
    1982) passes only when every L_s is shown to be below eps, with no multiplicity correction.
    The hardest s is the observed one (the plug-in estimate); its test is a score test: the
    variance of mean(m_i r_i) is taken under the null, at per-image accuracies moved from the
    observed ones just enough that L_s = eps (so a sample that happens to show few errors does
    not also get a small variance), with a continuity correction of half a lattice step."""
    conf = np.asarray(conf, np.float64)
    correct = np.asarray(correct, np.float64)
    n = conf.size
    residual = conf - correct
    signs = _signs(profile.project(conf, residual))
    m = profile.weights(conf, signs)
    estimate = float(np.mean(m * residual))
    pi_hat = _null_accuracy(conf, correct)
    v_hat = pi_hat * (1.0 - pi_hat)
    tilt = float(np.mean(m * m * v_hat))
    start = float(np.mean(m * (conf - pi_hat)))
    z = z_quantile(confidence)
    step = CONTINUITY * float(np.max(np.abs(m))) / n

    def passes(eps: float) -> bool:
        pi0 = np.clip(pi_hat - (eps - start) / tilt * m * v_hat, 0.0, 1.0)
        second_moment = float(np.mean(m * m * ((conf - pi0) ** 2 + pi0 * (1.0 - pi0))))
        variance = max(second_moment - eps * eps, 1e-300) / n
        return eps - estimate - step >= z * math.sqrt(variance)

    return Bound(estimate, _first_crossing(passes, estimate, 1.0), "intersection-union score")


def calibration_error_lower_bound(
    conf: np.ndarray, correct: np.ndarray, profile: ResidualProfile, confidence: float, seed: int = 0
) -> Bound:
    """Lower bound of the calibration error ||P(r)||_1 / D of one model (monitoring: has it drifted?).

    For any fixed sign pattern s, <s, P(r)> / D = mean(m_i r_i) is at most the error. With s fitted
    on one half of the images and the mean taken on the other (cross-fitting), the mean is, given
    the first half, an average of independent values whose expectation is below the error, where
    the plug-in estimate is biased upward. Each half's mean gets a studentized lower bound at
    1 - alpha/2, with the roles swapped for the other; both hold at once with probability at least
    1 - alpha (union bound), so their average bounds the error. (Pooling both halves in one mean
    would not do: each half's signs depend on the other's residuals, which correlates the two halves
    positively and made the pooled bound exceed a true error of 0 in 10% of simulations.) The
    values' large ones are mistakes (m r = conf); a sample that misses rare mistakes has a smaller
    mean, so rarity errs on the side of "no drift"."""
    conf = np.asarray(conf, np.float64)
    residual = conf - np.asarray(correct, np.float64)
    estimate = profile.error(conf, residual)
    half = np.random.default_rng(seed).permutation(conf.size) % 2 == 1
    level = 1.0 - (1.0 - confidence) / 2.0
    lowers = []
    for fit, use in ((half, ~half), (~half, half)):
        n = int(use.sum())
        if n < 2 or not fit.any():
            return Bound(estimate, 0.0, "cross-fit lower bound")
        values = (profile.weights(conf, _signs(profile.project(conf[fit], residual[fit]))) * residual)[use]
        lowers.append(
            float(values.mean() - stats.t.ppf(level, n - 1) * values.std(ddof=1) / math.sqrt(n) - CONTINUITY / n)
        )
    return Bound(estimate, max(0.0, float(np.mean(lowers))), "cross-fit lower bound, two halves")


FIRST_BLOCK = 32  # images before the comparison first re-chooses its functional and the champion's pattern


def _blocks(n: int) -> list[tuple[int, int]]:
    """[0, 32), [32, 64), [64, 128), ...: each block's choices are made from the images before it."""
    edges = [0]
    while edges[-1] < n:
        edges.append(min(n, max(FIRST_BLOCK, 2 * edges[-1])))
    return list(zip(edges[:-1], edges[1:]))


def _penalised_mean(values: np.ndarray) -> float:
    return float(values.mean() + values.std() / math.sqrt(values.size))


def calibration_error_increase_upper_bound(
    candidate_conf: np.ndarray,
    candidate_correct: np.ndarray,
    champion_conf: np.ndarray,
    champion_correct: np.ndarray,
    profile: ResidualProfile,
    confidence: float,
    seed: int = 0,
) -> tuple[Bound, dict[str, float]]:
    """Upper bound of error(candidate) - error(champion) on the same images, at the full level.

    Two per-image values each have a mean at least the difference (docs/gates.md derives both):
    A  u_i = m_a,i r_a,i - m_b,i r_b,i under the sign pattern of the difference of the two
       residual profiles: its mean is ||P_a(r_a)/D_a - P_b(r_b)/D_b||_1 >= |E(a) - E(b)| (triangle
       inequality). It is 0 on every image where the two models agree, so models that predict
       alike get a bound near the least any test can give (720 identical images: 0.0092).
    B  the candidate's signed residual under its own pattern minus the champion's under a pattern
       t_i fitted on the images before i: for any fixed t the champion's term is at most its error,
       so B's mean bounds the difference; it is tight when the candidate is far better calibrated
       than the champion (a recalibrated champion), where A is as large as the change.
    The images are taken in a seeded random order, and each block (32, 64, 128, ... images) uses
    whichever of A and B had the smaller mean plus standard error on the images before it. Both
    choices are made from earlier images only, so under "difference >= m" every value's
    conditional mean is >= m, and one betting bound (betting_upper_bound) at the full level holds:
    no level is split between A and B. As for max_ece, the candidate's sign patterns are the
    observed, hardest ones (intersection-union over patterns)."""
    a_conf, b_conf = np.asarray(candidate_conf, np.float64), np.asarray(champion_conf, np.float64)
    a_res = a_conf - np.asarray(candidate_correct, np.float64)
    b_res = b_conf - np.asarray(champion_correct, np.float64)
    n = a_conf.size

    a_profile = profile.project(a_conf, a_res) / profile.mass(a_conf)
    b_profile = profile.project(b_conf, b_res) / profile.mass(b_conf)
    difference_signs = _signs(a_profile - b_profile)
    a_weights, b_weights = profile.weights(a_conf, difference_signs), profile.weights(b_conf, difference_signs)
    paired = a_weights * a_res - b_weights * b_res
    largest_a = float(np.max(np.abs(a_weights)) + np.max(np.abs(b_weights)))  # |r| <= 1

    order = np.random.default_rng(seed).permutation(n)
    candidate_weights = profile.weights(a_conf, _signs(a_profile))
    champion_term = np.empty(n)
    choice = np.empty(n, dtype=bool)  # True: value A
    for start, stop in _blocks(n):
        seen, now = order[:start], order[start:stop]
        # the champion is usually over-confident: all + before any image is seen (any fixed start is valid)
        pattern = _signs(profile.project(b_conf[seen], b_res[seen])) if start else np.ones_like(b_profile)
        champion_term[now] = profile.weights(b_conf, pattern)[now] * b_res[now]
        if start == 0 or not np.any(paired[seen]):
            choice[now] = True  # models that have agreed on every image so far: A is 0, B cannot beat it
        else:
            crossfit_seen = candidate_weights[seen] * a_res[seen] - champion_term[seen]
            choice[now] = _penalised_mean(paired[seen]) <= _penalised_mean(crossfit_seen)
    crossfit = candidate_weights * a_res - champion_term
    # the champion's weights are largest for one sign everywhere (|sum_g s_g K_g| <= sum_g K_g)
    champion_largest = float(np.max(np.abs(profile.weights(b_conf, np.ones_like(a_profile)))))
    largest_b = float(np.max(np.abs(candidate_weights))) + champion_largest
    largest = max(largest_a, largest_b)
    values = np.where(choice, paired, crossfit)[order]
    bound = betting_upper_bound(values, confidence, low=-largest, high=largest)

    estimate = float(np.abs(a_profile).sum() - np.abs(b_profile).sum())
    parts = {
        "paired_profile_distance": float(paired.mean()),
        "candidate_minus_crossfit_champion": float(crossfit.mean()),
        "share_paired": float(choice.mean()),
    }
    return Bound(estimate, bound, "betting on paired and cross-fitted values"), parts


def brier_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image multiclass Brier score sum_k (p_k - [y = k])^2, in [0, 2]."""
    p = np.asarray(probabilities, dtype=np.float64)
    squared = np.sum(p * p, axis=1)
    return squared - 2.0 * p[np.arange(p.shape[0]), np.asarray(labels)] + 1.0


def brier_increase_upper_bound(
    candidate_probabilities: np.ndarray,
    champion_probabilities: np.ndarray,
    labels: np.ndarray,
    confidence: float,
    seed: int = 0,
) -> Bound:
    """Upper bound of E[Brier(candidate) - Brier(champion)] on the same images.

    The per-image difference lies in [-2, 2] and is an unbiased estimate of the expected one, so
    a betting bound of its mean is exact at every n. Two similar models differ little on most
    images, which gives the paired mean a small variance; the rare images where one is
    confidently wrong and the other right are charged by how often they can go unseen."""
    difference = brier_scores(candidate_probabilities, labels) - brier_scores(champion_probabilities, labels)
    order = np.random.default_rng(seed).permutation(difference.size)
    bound = betting_upper_bound(difference[order], confidence, low=-2.0, high=2.0)
    return Bound(float(difference.mean()), bound, "betting on the paired Brier difference")


# ---------------------------------------------------------------------------------------------
# Out-of-distribution detection
# ---------------------------------------------------------------------------------------------


def empirical_tpr_threshold(inside: np.ndarray, tpr: float) -> float:
    """The largest observed score that keeps (score >= it) at least `tpr` of the in-distribution
    scores."""
    ordered = np.sort(np.asarray(inside, np.float64))
    return float(ordered[int(math.floor((1.0 - tpr) * ordered.size + 1e-9))])


def fpr_at_tpr_upper_bound(inside: np.ndarray, outside: np.ndarray, tpr: float, confidence: float) -> Bound:
    """Upper bound of FPR(t*) = P(OOD score >= t*), where t* is the largest threshold keeping at
    least `tpr` of in-distribution images (FPR95 for tpr = 0.95); scores: higher = in-distribution.

    Two steps at 1 - alpha/2 each (Bonferroni). (1) A threshold below t*: the j-th smallest of n
    in-distribution scores is <= t* as soon as j of them are <= t*; their count is at least
    Binomial(n, 1 - tpr) (P(S <= t*) >= 1 - tpr, ties included), so j is the largest with
    P(Binomial(n, 1 - tpr) < j) <= alpha/2. (2) FPR is falling in the threshold, so FPR(t_j) >=
    FPR(t*), and the OOD images are independent of t_j: a Clopper-Pearson upper bound of the share
    of OOD scores >= t_j bounds FPR(t*). With too few in-distribution images for (1) the bound is 1."""
    inside = np.asarray(inside, np.float64)
    outside = np.asarray(outside, np.float64)
    n, m = inside.size, outside.size
    if n == 0 or m == 0:
        raise ValueError("FPR at a TPR needs in-distribution and out-of-distribution scores")
    estimate = float(np.mean(outside >= empirical_tpr_threshold(inside, tpr)))
    half = 1.0 - (1.0 - confidence) / 2.0
    # largest j with cdf(j - 1) <= alpha / 2; binom.ppf gives the smallest k with cdf(k) >= alpha / 2
    k = int(stats.binom.ppf(1.0 - half, n, 1.0 - tpr))
    j = k if stats.binom.cdf(k, n, 1.0 - tpr) > 1.0 - half else k + 1
    if j < 1:
        return Bound(estimate, 1.0, "order statistic + clopper-pearson (too few in-distribution images)")
    threshold = float(np.sort(inside)[j - 1])
    kept = int(np.sum(outside >= threshold))
    return Bound(estimate, clopper_pearson_upper(kept, m, half), "order statistic + clopper-pearson")
