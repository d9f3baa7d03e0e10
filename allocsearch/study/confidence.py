"""How sure is the winner? One configuration's trials on several seeds -> mean +- a 95% confidence
interval, and which configurations are statistically tied with the best. Torch-, Optuna- and Ray-free:
``status``, the dashboard, ``export``, the confirmation phase and the replay benchmark all read this.

A configuration is its parameters (every seed of it is its own trial). The winner: the best mean among
the configurations the confirmation race re-ran and did not show worse than the best beyond noise (before
a race: among all). The noise: ``noise_of``. Ties with the best:
- paired by seed where both were run on >= 2 common seeds: the best is separated from a configuration when
  the 95% interval of their per-seed differences lies above 0 (a paired t-test, one sided at 2.5%);
- otherwise (a single run on either side) the difference of means against the seed noise ``noise`` (a
  standard deviation, measured by the study's repeated runs or declared by the space):
  ``diff > 1.96 * noise * sqrt(1/n_best + 1/n_other)``; without a noise estimate nothing is separated.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from allocsearch.study.records import State, config_key  # config_key: readers import it from here too

# two-sided 95% Student t quantiles by degrees of freedom (beyond 30: the normal's 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


@dataclass
class Estimate:
    key: str
    params: dict
    values: dict = field(default_factory=dict)  # seed -> objective of its completed trial
    trials: dict = field(default_factory=dict)  # seed -> trial number
    stopped: set = field(default_factory=set)  # seeds whose run early stopping cut and that never completed

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values.values()) if self.n > 1 else None

    def half_width(self, noise: float | None = None) -> float | None:
        """The 95% interval's half width: from its own seeds (n >= 2), or from ``noise`` for one run."""
        if self.n > 1:
            return t95(self.n - 1) * self.std / math.sqrt(self.n)
        return 1.96 * noise if noise else None

    def first_trial(self) -> int:
        return min(self.trials.values())

    def to_dict(self, noise: float | None = None) -> dict:
        return {"params": self.params, "n": self.n, "mean": self.mean, "std": self.std,
                "ci95": self.half_width(noise), "seeds": sorted(self.values), "trials": sorted(self.trials.values()),
                "values": [self.values[s] for s in sorted(self.values)]}


def estimates(rows) -> list[Estimate]:
    """Completed trials (``records.TrialRecord`` rows) grouped by configuration, best mean first. A seed run
    twice (a retry) counts once: its first completed trial."""
    out: dict[str, Estimate] = {}
    stopped: dict[str, set] = {}
    for r in sorted(rows, key=lambda r: r.number):
        if r.state == State.PRUNED and r.params:
            stopped.setdefault(r.key, set()).add(r.seed)
        if r.state != State.COMPLETED or r.objective is None or not r.params:
            continue
        key = r.key
        est = out.setdefault(key, Estimate(key, dict(r.params)))
        if r.seed not in est.values:
            est.values[r.seed], est.trials[r.seed] = float(r.objective), r.number
    for key, est in out.items():
        est.stopped = stopped.get(key, set()) - set(est.values)
    return sorted(out.values(), key=lambda e: (-e.mean, e.first_trial()))


MIN_POOLED = 3  # repeated configurations before a pooled noise replaces a declared one
MIN_SPREAD = 5  # configurations before their spread bounds the noise


def _chi2_median_over_df(df: int) -> float:
    """median(chi^2_df) / df: tabulated up to 5 degrees of freedom, beyond by Wilson-Hilferty (error < 0.2%)."""
    return {1: 0.454936, 2: math.log(2), 3: 0.788658, 4: 0.839173, 5: 0.870292}.get(df) or (1 - 2 / (9 * df)) ** 3


def pooled_noise(ests: list[Estimate]) -> float | None:
    """The seed noise (a standard deviation) of the configurations run on >= 2 seeds: the median over them
    of s_i^2 / (median(chi^2_df_i) / df_i), each a median-unbiased estimate of sigma^2 under normal seed noise.

    A median, not the textbook df-weighted mean of the variances: a configuration whose learning rate
    diverged on one seed (0.50 against 0.82 on the others) is a fact about that configuration, which its own
    interval carries, not the noise every other comparison is judged by. On the recorded SST-2 table the
    mean of variances gave 0.067, five diverged configurations out of 33 inflating it over 5x the 0.012 the
    others show, and with it every configuration was "within noise" of the best."""
    terms = [e.std ** 2 / _chi2_median_over_df(e.n - 1) for e in ests if e.n > 1]
    return math.sqrt(statistics.median(terms)) if terms else None


def spread_bound(ests: list[Estimate]) -> float | None:
    """An upper bound on the seed noise from every configuration's score, repeated or not: 1.4826 x the
    median absolute deviation of their means (a robust standard deviation). Seed noise is part of the
    spread across configurations, so it cannot be larger; a configuration that diverged does not move a
    median. None with fewer than ``MIN_SPREAD`` configurations."""
    means = [e.mean for e in ests]
    if len(means) < MIN_SPREAD:
        return None
    mid = statistics.median(means)
    return 1.4826 * statistics.median(abs(m - mid) for m in means)


def noise_of(ests: list[Estimate], declared: float | None = None) -> float | None:
    """The seed noise the calls are made with: the pooled one once configurations ran on several seeds (a
    measured 0 is a measurement), else ``declared`` (``--noise``, a table's), else None. Until ``MIN_POOLED``
    configurations were repeated the median rule cannot tell one configuration that diverged on a seed
    (0.83 and 0.50: a "noise" of 0.24) from noise: a declared noise is kept, and a pooled one is capped by
    ``spread_bound`` (measured on the replay: a one-run race whose finalist diverged crowned it at 0.667
    against single runs at 0.83 without the cap)."""
    pooled = pooled_noise(ests)
    if sum(e.n > 1 for e in ests) < MIN_POOLED:
        if declared is not None:
            return declared
        bound = spread_bound(ests)
        if pooled is not None and bound is not None:
            return min(pooled, bound)
    return pooled if pooled is not None else declared


def separated(best: Estimate, other: Estimate, noise: float | None) -> bool:
    """Whether ``best`` is better than ``other`` beyond seed noise (see the module's rule)."""
    common = sorted(set(best.values) & set(other.values))
    if len(common) >= 2 and (best.n > 1 and other.n > 1):
        diffs = [best.values[s] - other.values[s] for s in common]
        sd = statistics.stdev(diffs)
        low = statistics.fmean(diffs) - t95(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        return low > 0
    return beyond_noise(best, other, noise)


def beyond_noise(best: Estimate, other: Estimate, noise: float | None) -> bool:
    """``best``'s mean lies above ``other``'s by more than seed noise allows at their n (z at 95%, two sided):
    ``diff > 1.96 * noise * sqrt(1/n_best + 1/n_other)``; without a noise estimate, never."""
    if not noise:
        return False
    return best.mean - other.mean > 1.96 * noise * math.sqrt(1 / best.n + 1 / other.n)


def raced(rows) -> set[str]:
    """The configurations a confirmation race re-ran to the end (completed confirmation runs)."""
    return {r.key for r in rows if r.confirm_of is not None and r.params and r.state == State.COMPLETED}


def winner(ests: list[Estimate], race: set[str] | None = None, noise: float | None = None) -> Estimate | None:
    """The configuration to export: the best mean among those a confirmation race re-ran (``race``), or,
    before any race, among all (a configuration drawn again on another seed is judged by its mean; with no
    repeats this is the single best score). Preferring the most-repeated would crown whatever a sampler
    happened to draw most often.

    A re-run configuration the race showed to be worse than the best mean beyond seed noise (``separated``,
    with ``noise_of(ests, noise)``) leaves that pool: a race that could pay for one run re-ran its first
    finalist, whose new seed diverged (0.833 then 0.50), and crowned it at 0.667 against single runs at
    0.83 (measured on the replay). With no other re-run configuration left, the best mean of all wins.

    A configuration early stopping cut on a seed it never completed is passed over while another has no
    such seed: its mean is over the seeds it survived (0.826 for a LoRA whose third seed collapsed to 0.50
    and was stopped, measured on the replay), so it is the survivors' mean, not the configuration's."""
    pool = [e for e in ests if race and e.key in race]
    if pool:
        top, sigma = max(ests, key=lambda e: e.mean), noise_of(ests, noise)
        pool = [e for e in pool if e is top or not separated(top, e, sigma)]
    pool = pool or ests
    pool = [e for e in pool if not e.stopped] or pool
    return max(pool, key=lambda e: (e.mean, -e.first_trial()), default=None)


def winner_of(rows, noise: float | None = None) -> Estimate | None:
    """``winner`` of a study's trial rows; ``noise``: the declared seed noise (the study's ``noise``)."""
    return winner(estimates(rows), raced(rows), noise)


def evidence(rows, noise: float | None = None, top: int = 5) -> dict | None:
    """What ``status``, the dashboard and ``export`` show about the winner: the finalists (mean, 95% CI,
    n, seeds), which are tied with the winner, and the noise the calls were made with."""
    ests = estimates(rows)
    best = winner(ests, raced(rows), noise)
    if best is None:
        return None
    noise = noise_of(ests, noise)
    others = [e for e in ests if e is not best]
    finalists = [best] + sorted([e for e in others if e.n > 1], key=lambda e: -e.mean)
    finalists += [e for e in others if e.n == 1][:max(0, top - len(finalists))]
    tied = [e for e in others if not separated(best, e, noise)]
    return {"winner": best.to_dict(noise), "noise": noise, "configurations": len(ests),
            "finalists": [dict(e.to_dict(noise), tied=e is not best and e in tied) for e in finalists],
            "tied": [e.to_dict(noise) for e in tied]}


def finalist_mark(f: dict, ev: dict) -> str:
    """How ``status`` and the dashboard label one of ``evidence``'s finalists: ``winner``, ``tied``, ``tied,
    1 seed`` (a single run that scored above the winner's mean but was never re-run: it may be a lucky
    seed, which is why it is not the winner), or ''."""
    if f["trials"] == ev["winner"]["trials"]:
        return "winner"
    if not f["tied"]:
        return ""
    return "tied, 1 seed" if f["n"] == 1 and f["mean"] > ev["winner"]["mean"] else "tied"


__all__ = ["Estimate", "MIN_POOLED", "MIN_SPREAD", "beyond_noise", "config_key", "estimates", "evidence",
           "finalist_mark", "noise_of", "pooled_noise", "raced", "separated", "spread_bound", "t95", "winner",
           "winner_of"]
