"""Small statistics for comparing runs: the t interval of a few seeds' mean, and a paired cluster bootstrap of
the difference of two pooled Jaccards. Pure numpy (and scipy for the t quantile); no MLflow.

The pooled Jaccard of a table of per-chip counts is the competition metric (sum of intersections / sum of
unions over chips), computed per seed; a run's figure is the mean of its seeds' pooled figures (one seed: just
the pooled figure), which is what a repeat parent's ``<metric>_mean`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95  # two-sided level of every interval here
_CHUNK_CELLS = 2_000_000  # bootstrap replicates x groups drawn per chunk: bounds memory on 11,748-chip tables


def mean_sd_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation (ddof=1) and the two-sided t interval of the mean of a few values.

    Meant for a handful of seeds: ``mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n)``. With one value the
    spread is unknown: sd and both bounds are NaN.

    Args:
        values: The per-seed figures. Shape: (n,).
        confidence: Two-sided level of the interval.

    Returns:
        ``(mean, sd, ci_low, ci_high)`` as floats.

    Raises:
        ValueError: no values, a non-finite value, or a confidence outside (0, 1).
    """
    from scipy import stats as sps

    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_sd_ci: no values")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_sd_ci: non-finite values in {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"mean_sd_ci: confidence={confidence} must be in (0, 1)")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan"), float("nan")
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df=x.size - 1)) * sd / np.sqrt(x.size)
    return mean, sd, float(mean - half), float(mean + half)


def pooled_per_seed(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Pooled Jaccard of each seed column (NaN where a column's total union is 0).

    Shape: inter and union (n_chips, n_seeds) -> (n_seeds,).
    """
    i, u = np.asarray(inter, dtype=np.float64).sum(axis=0), np.asarray(union, dtype=np.float64).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(u > 0, i / np.where(u > 0, u, 1), np.nan)


def figure(inter: np.ndarray, union: np.ndarray) -> float:
    """A run's figure: the mean over seeds of each seed's pooled Jaccard. Shape: (n_chips, n_seeds) each."""
    return float(np.mean(pooled_per_seed(inter, union)))


@dataclass
class Bootstrap:
    """The outcome of ``paired_bootstrap``: the observed difference and its percentile interval."""

    delta: float  # figure(A) - figure(B) on the data as observed
    ci_low: float
    ci_high: float
    deltas: np.ndarray  # one difference per usable replicate. Shape: (n_boot - n_dropped,)
    n_groups: int  # resampling units (chips or locations)
    n_dropped: int  # replicates whose drawn groups have no union on one side (figure undefined)
    paired_seeds: bool

    @property
    def verdict(self) -> str:
        """``a_better`` / ``b_better`` when the interval excludes 0, else ``no_detectable_difference``."""
        if self.ci_low > 0:
            return "a_better"
        if self.ci_high < 0:
            return "b_better"
        return "no_detectable_difference"


def _group_sums(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group column sums. Shape: (n_chips, n_seeds) -> (n_groups, n_seeds)."""
    out = np.zeros((n_groups, values.shape[1]), dtype=np.float64)
    np.add.at(out, codes, values)
    return out


def _seed_weights(rng: np.random.Generator, n_rep: int, n_seeds: int) -> np.ndarray:
    """Times each seed is drawn (n_seeds draws with replacement) per replicate. Shape: (n_rep, n_seeds)."""
    if n_seeds == 1:
        return np.ones((n_rep, 1))
    return rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_rep).astype(np.float64)


def paired_bootstrap(a_inter, a_union, b_inter, b_union, groups, n_boot: int = 10_000, seed: int = 0,
                     paired_seeds: bool = False, confidence: float = CONFIDENCE) -> Bootstrap:
    """Bootstrap the difference of two runs' figures over the same chips.

    Each replicate draws resampling units (``groups``: a chip id each for a chip-level bootstrap, a location
    each for a cluster bootstrap by location) with replacement, the same draw for both runs, so chip-to-chip
    difficulty cancels out of the difference. Seeds are drawn with replacement too: independently for each
    run, or, with ``paired_seeds``, the same seed columns for both (the runs share their seeds column by
    column).

    Args:
        a_inter, a_union: Run A's counts. Shape: (n_chips, n_seeds_a).
        b_inter, b_union: Run B's counts on the same chips in the same order. Shape: (n_chips, n_seeds_b).
        groups: The resampling unit of each chip. Shape: (n_chips,).
        n_boot: Replicates.
        seed: Seeds numpy's generator: same inputs and seed, same interval.
        paired_seeds: Draw the same seed columns for A and B (needs n_seeds_a == n_seeds_b).
        confidence: Two-sided level of the percentile interval.

    Raises:
        ValueError: shapes that do not line up, fewer than one replicate, no usable replicate, or an undefined
            figure on the data as observed (no union at all).
    """
    ai, au, bi, bu = (np.atleast_2d(np.asarray(x, dtype=np.float64).T).T for x in (a_inter, a_union, b_inter,
                                                                                       b_union))
    groups = np.asarray(groups)
    n = groups.shape[0]
    if ai.shape != au.shape or bi.shape != bu.shape or ai.shape[0] != n or bi.shape[0] != n:
        raise ValueError(f"paired_bootstrap: counts of shapes {ai.shape}/{au.shape} (A), "
                         f"{bi.shape}/{bu.shape} (B) do not line up with {n} chips")
    if paired_seeds and ai.shape[1] != bi.shape[1]:
        raise ValueError(f"paired_seeds needs as many seeds on both sides ({ai.shape[1]} vs {bi.shape[1]})")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be at least 1")
    delta = figure(ai, au) - figure(bi, bu)
    if not np.isfinite(delta):
        raise ValueError("a run has no union on these chips (no cloud predicted or labelled): the Jaccard is "
                         "undefined")
    _, codes = np.unique(groups, return_inverse=True)
    n_groups = int(codes.max()) + 1
    sums = [_group_sums(x, codes.ravel(), n_groups) for x in (ai, au, bi, bu)]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n_groups)
    out = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        w = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=m).astype(np.float64)
        sw_a = _seed_weights(rng, m, ai.shape[1])
        sw_b = sw_a if paired_seeds else _seed_weights(rng, m, bi.shape[1])
        figs = []
        for (inter, union), sw in (((sums[0], sums[1]), sw_a), ((sums[2], sums[3]), sw_b)):
            i, u = w @ inter, w @ union  # (m, n_seeds): each seed's pooled counts over the drawn groups
            with np.errstate(invalid="ignore", divide="ignore"):
                j = np.where(u > 0, i / np.where(u > 0, u, 1), np.nan)
            # a drawn seed whose drawn chips have no union leaves the replicate undefined (NaN * 0 is NaN)
            j = np.where(sw > 0, j, 0.0)
            figs.append((j * sw).sum(axis=1) / sw.sum(axis=1))
        out.append(figs[0] - figs[1])
    deltas = np.concatenate(out)
    ok = np.isfinite(deltas)
    if not ok.any():
        raise ValueError("no bootstrap replicate has a defined Jaccard on both sides")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(deltas[ok], [alpha, 1 - alpha])
    return Bootstrap(float(delta), float(low), float(high), deltas[ok], n_groups, int((~ok).sum()),
                     paired_seeds)
