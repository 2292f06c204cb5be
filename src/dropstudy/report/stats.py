"""The statistics of a report table: a setting's mean with its 95% t interval over seeds, and a
setting against a baseline (difference of means with its interval, p-values, effect size, wins).

Seeds are the unit of replication. Two settings run on the same seeds are compared seed by seed
(paired t-test and Wilcoxon signed-rank on the per-seed differences, effect size Cohen's d_z);
otherwise as independent samples (Welch's t-test, effect size Hedges' g). The distributions and
tests are scipy.stats'; only the effect sizes, one line each, are written here. A report compares
several settings with one baseline, so `holm` adjusts each family of p-values for that.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as sps

CONFIDENCE = 0.95
PAIRED = "paired"
WELCH = "Welch"


@dataclass
class Stat:
    """A metric over seeds: n, mean, sample std and the t interval of the mean (nan where n < 2)."""

    mean: float
    std: float
    n: int
    low: float = math.nan
    high: float = math.nan


def describe(values: Sequence[float | None]) -> Stat:
    """The finite numbers among `values`, summarised; missing or non-finite ones are left out."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return Stat(math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Stat(mean, math.nan, 1)
    std = statistics.stdev(xs)
    half = float(sps.t.ppf((1 + CONFIDENCE) / 2, len(xs) - 1)) * std / math.sqrt(len(xs))
    return Stat(mean, std, len(xs), mean - half, mean + half)


@dataclass
class Comparison:
    """A setting against the baseline on one metric: `diff` is setting − baseline."""

    design: str  # PAIRED or WELCH
    n: int  # pairs (paired), or the setting's runs (Welch)
    n_baseline: int
    diff: float
    low: float
    high: float
    p_t: float
    p_wilcoxon: float  # paired only; nan for Welch
    effect: float  # Cohen's d_z (paired) or Hedges' g (Welch)
    wins: int | None  # seeds where the setting is better; None where unpaired or no direction
    notes: tuple[str, ...] = ()
    # p_t and p_wilcoxon Holm-adjusted across the settings compared with the baseline (`holm`).
    p_t_holm: float = math.nan
    p_wilcoxon_holm: float = math.nan

    @property
    def test(self) -> str:
        return "paired t" if self.design == PAIRED else "Welch t"

    @property
    def effect_name(self) -> str:
        return "d_z" if self.design == PAIRED else "g"


def _quiet(fn, *args, **kwargs) -> float:
    """A p-value from scipy, nan where the test is undefined (no spread, too few values) rather
    than a warning or an exception: the table says n/a and why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = float(fn(*args, **kwargs).pvalue)
        except (ValueError, ZeroDivisionError, FloatingPointError):
            return math.nan
    return value


def paired(setting: Sequence[float], baseline: Sequence[float], higher_is_better: bool | None) -> Comparison:
    """Same seeds in the same order: the per-seed differences carry the comparison."""
    d = [s - b for s, b in zip(setting, baseline, strict=True)]
    n, notes = len(d), []
    mean = statistics.fmean(d)
    low = high = p_t = p_w = effect = math.nan
    if n < 2:
        notes.append("one pair of seeds: no interval or test")
    else:
        sd = statistics.stdev(d)
        half = float(sps.t.ppf((1 + CONFIDENCE) / 2, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        if sd > 0:
            p_t = _quiet(sps.ttest_rel, setting, baseline)
            effect = mean / sd
        else:
            notes.append("the same difference on every seed: no spread, so no t-test or effect size")
        if any(x != 0 for x in d):
            p_w = _quiet(sps.wilcoxon, setting, baseline)
        else:
            notes.append("no difference on any seed: no Wilcoxon test")
    wins = None
    if higher_is_better is not None:
        wins = sum(1 for x in d if (x > 0 if higher_is_better else x < 0))
    return Comparison(PAIRED, n, n, mean, low, high, p_t, p_w, effect, wins, tuple(notes))


def welch(setting: Sequence[float], baseline: Sequence[float]) -> Comparison:
    """Different seeds: independent samples with unequal variances."""
    n1, n0 = len(setting), len(baseline)
    diff = statistics.fmean(setting) - statistics.fmean(baseline)
    low = high = p_t = effect = math.nan
    notes = []
    if n1 < 2 or n0 < 2:
        notes.append("a setting with one seed: no interval or test")
    else:
        v1, v0 = statistics.variance(setting), statistics.variance(baseline)
        if v1 + v0 > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = sps.ttest_ind(setting, baseline, equal_var=False)
                interval = result.confidence_interval(CONFIDENCE)
            low, high, p_t = float(interval.low), float(interval.high), float(result.pvalue)
            pooled = math.sqrt(((n1 - 1) * v1 + (n0 - 1) * v0) / (n1 + n0 - 2))
            # Hedges' g: Cohen's d on the pooled std, times the small-sample correction J.
            effect = diff / pooled * (1 - 3 / (4 * (n1 + n0) - 9))
        else:
            low = high = diff
            notes.append("no spread within either setting: no t-test or effect size")
    return Comparison(WELCH, n1, n0, diff, low, high, p_t, math.nan, effect, None, tuple(notes))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order: sorted ascending,
    the i-th of m (from 0) becomes max over j <= i of min(1, (m - j) * p_(j)). It controls the
    family-wise error rate with no assumption about how the tests depend on each other (they
    share a baseline). A nan (no test) stays nan and is not counted in m."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted
