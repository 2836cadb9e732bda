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

import math
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


def mean_upper_bound(values: np.ndarray, confidence: float) -> Bound:
    """Upper bound of a mean by Hall's (1992) transformation of the studentized mean.

    With theta = (xbar - mu) / s and skewness g, sqrt(n) * h(theta) is N(0, 1) to second order,
    h(x) = x + g x^2 / 3 + g^2 x^3 / 27 + g / (6 n) = ((1 + g x / 3)^3 - 1) / g + g / (6 n),
    which is monotone and has a closed-form inverse. So mu <= xbar - s h^-1(-q / sqrt(n)), with q
    Student's t quantile on n - 1 degrees of freedom (measured on exponential data: 6.2% misses
    at n = 25 and 5.5% at n = 100 and 200 where the plain t bound misses 9.9%, 7.9% and 7.1%).
    The plain t bound ignores that a sample without its rare large losses also has a small s."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    mean = float(x.mean())
    if n < 2:
        return Bound(mean, math.inf, "hall-t (too few values)")
    s = float(x.std(ddof=1))
    if s == 0.0:
        return Bound(mean, mean, "hall-t")
    skew = float(np.mean((x - mean) ** 3)) / s**3
    target = -float(stats.t.ppf(confidence, n - 1)) / math.sqrt(n)
    if abs(skew) < 1e-9:
        theta = target
    else:
        theta = 3.0 / skew * (np.cbrt(1.0 + skew * (target - skew / (6.0 * n))) - 1.0)
    return Bound(mean, mean - s * float(theta), "hall-t")


def nll_upper_bound(
    top_loss: np.ndarray, loss: np.ndarray, correct: np.ndarray, confidence: float, max_loss: float
) -> Bound:
    """Upper bound of the expected NLL, built around its rare large terms.

    An image's loss is its top-label loss -log c_i when the top label is right, and that plus an
    excess when it is wrong. So NLL = E[-log c] + P(error) E[excess | error], and a bound of each
    factor at level 1 - alpha/3 bounds NLL at 1 - alpha (Bonferroni; all terms are >= 0):
    Hall's bound for the two means, Clopper-Pearson for the error rate. Where the excess comes
    from a few dozen errors (a confident model), a bound of the plain mean misses more often
    than stated (6.2% at n = 1,000 in the benchmark, for Hall's and the bootstrap-t alike): the
    count of errors is what varies, and the exact binomial bound takes that part."""
    level = 1.0 - (1.0 - confidence) / 3.0
    n = loss.size
    errors = ~np.asarray(correct, bool)
    k = int(errors.sum())
    rate = clopper_pearson_upper(k, n, level)
    excess = loss[errors] - top_loss[errors]
    excess_bound = mean_upper_bound(excess, level).bound if k >= 2 else max_loss
    bound = mean_upper_bound(top_loss, level).bound + rate * min(excess_bound, max_loss)
    return Bound(float(loss.mean()), float(bound), "error-rate x excess (Clopper-Pearson, Hall)")


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

    def project(self, conf, values):
        return self.kernel.apply(conf, values, self.t)

    def mass(self, conf):
        eps = 0.0001  # relplot's BaseKernelMixin.smooth adds it to the density
        return float(np.sum(self.kernel.apply(conf, np.ones_like(conf), self.t) + eps))

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


def smooth_ece(conf: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """relplot's smooth ECE with its automatic bandwidth: (value, sigma)."""
    import relplot

    value, sigma = relplot.smECE(np.asarray(conf, np.float64), np.asarray(correct, np.float64), return_width=True)
    return float(value), float(sigma)


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


LARGE = 0.5  # a paired value this large comes from an image the two models judge differently


def paired_mean_upper_bound(values: np.ndarray, confidence: float, largest: float) -> float:
    """Upper bound of the mean of paired per-image values that are mostly small, with rare large
    ones where the two models' correctness differs (|u| <= `largest`).

    A sample that happens to miss the rare large values also has a small standard deviation, so a
    studentized bound of the plain mean passes a candidate on the tolerance far too often (11-27%
    for a confident candidate wrong on 1% more images than its champion). So the mean is split:
    values below LARGE in size (studentized, they are many), large positive ones (Clopper-Pearson
    bound of their rate times Hall's bound of their mean size, at most `largest`), and large
    negative ones (each at most -LARGE, times a Clopper-Pearson lower bound of their rate); each
    part at 1 - alpha/3 (Bonferroni)."""
    n = values.size
    if n < 2:
        return math.inf
    level = 1.0 - (1.0 - confidence) / 3.0
    small = np.where(np.abs(values) < LARGE, values, 0.0)
    bound = float(small.mean() + stats.t.ppf(level, n - 1) * small.std(ddof=1) / math.sqrt(n) + CONTINUITY / n)
    positive = values[values >= LARGE]
    k = positive.size
    rate = clopper_pearson_upper(k, n, level)
    size = mean_upper_bound(positive, level).bound if k >= 2 else largest
    bound += rate * min(size, largest)
    j = int(np.sum(values <= -LARGE))
    if j:
        bound -= LARGE * clopper_pearson_lower(j, n, level)
    return bound


def calibration_error_increase_upper_bound(
    candidate_conf: np.ndarray,
    candidate_correct: np.ndarray,
    champion_conf: np.ndarray,
    champion_correct: np.ndarray,
    profile: ResidualProfile,
    confidence: float,
    seed: int = 0,
) -> tuple[Bound, dict[str, float]]:
    """Upper bound of error(candidate) - error(champion) on the same images, and its two parts.

    Both parts are valid upper bounds at level 1 - alpha/2, so their minimum is one at 1 - alpha:
    A = ||P_a(r_a)/D_a - P_b(r_b)/D_b||_1 bounds the difference by the triangle inequality; it
        is the largest linear functional over sign patterns of the paired per-image value
        u_i = m_a,i r_a,i - m_b,i r_b,i, which cancels the noise the two models share.
    B = the candidate's error minus sum_g t_g P_b(r_b)_g / D_b for a sign pattern t fitted on the
        other half of the images (cross-fitting): for any fixed t that sum is at most the
        champion's error, and its estimate is unbiased, where the plug-in's is biased upward.
    Each is an upper bound, at 1 - alpha/2, of the mean of a per-image paired value
    (paired_mean_upper_bound: rare large values are bounded by their rate, not their spread)."""
    a_conf, b_conf = np.asarray(candidate_conf, np.float64), np.asarray(champion_conf, np.float64)
    a_res = a_conf - np.asarray(candidate_correct, np.float64)
    b_res = b_conf - np.asarray(champion_correct, np.float64)
    n = a_conf.size

    a_profile = profile.project(a_conf, a_res) / profile.mass(a_conf)
    b_profile = profile.project(b_conf, b_res) / profile.mass(b_conf)
    difference_signs = _signs(a_profile - b_profile)
    a_weights, b_weights = profile.weights(a_conf, difference_signs), profile.weights(b_conf, difference_signs)
    paired = a_weights * a_res - b_weights * b_res
    largest = float(np.max(np.abs(a_weights)) + np.max(np.abs(b_weights)))  # |r| <= 1
    bound_a = paired_mean_upper_bound(paired, 1.0 - (1.0 - confidence) / 2.0, largest)

    half = np.random.default_rng(seed).permutation(n) % 2 == 1
    champion_lower = np.zeros(n)
    for fit, use in ((half, ~half), (~half, half)):
        if fit.any() and use.any():
            fitted = _signs(profile.project(b_conf[fit], b_res[fit]))
            champion_lower[use] = profile.weights(b_conf, fitted)[use] * b_res[use]
    candidate_weights = profile.weights(a_conf, _signs(a_profile))
    crossfit = candidate_weights * a_res - champion_lower
    # the champion's weights are largest for one sign everywhere (|sum_g s_g K_g| <= sum_g K_g)
    champion_largest = float(np.max(np.abs(profile.weights(b_conf, np.ones_like(a_profile)))))
    largest_b = float(np.max(np.abs(candidate_weights))) + champion_largest
    bound_b = paired_mean_upper_bound(crossfit, 1.0 - (1.0 - confidence) / 2.0, largest_b)

    estimate = float(np.abs(a_profile).sum() - np.abs(b_profile).sum())
    parts = {"paired_profile_distance": bound_a, "candidate_minus_crossfit_champion": bound_b}
    return Bound(estimate, min(bound_a, bound_b), "min of paired and cross-fit bounds"), parts


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
