"""Early stopping that respects seed noise: asynchronous successive halving (ASHA, Li et al. 2020) with a
noise margin. Pure Python, so the live search (through Ray Tune, ``executor.RungScheduler``) and the replay
on a simulated clock (``allocsearch.bench.replay``) stop trials by the very same rule.

Rungs sit at ``grace x rf^k`` steps up to ``max_t`` (Tune's ``ASHAScheduler`` with one bracket). A trial
reaching a rung is compared with the scores recorded there before it: the cutoff is their
``(1 - 1/rf)`` quantile (the median for rf = 2), Tune's rule. ASHA stops the trial when its score is below
the cutoff; here it is stopped only when it is below ``cutoff - margin``: a checkpoint within the measured
seed noise of the cutoff is no evidence that the configuration is worse (margin 0 is Tune's ASHA).
"""
from __future__ import annotations

import math


def _quantile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, as Tune's ``np.nanpercentile`` computes the cutoff."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Rungs:
    def __init__(self, max_t: int, grace_period: int, reduction_factor: float = 2.0, margin: float = 0.0):
        if grace_period < 1 or max_t < grace_period or reduction_factor <= 1 or margin < 0:
            raise ValueError(f"bad rungs: max_t {max_t}, grace {grace_period}, rf {reduction_factor}, margin {margin}")
        self.rf, self.margin = float(reduction_factor), float(margin)
        count = int(math.log(max_t / grace_period) / math.log(self.rf) + 1 + 1e-9)
        self.milestones = [grace_period * self.rf ** k for k in range(count)]
        self.recorded: dict[float, dict] = {m: {} for m in self.milestones}

    def stop(self, key, step: int, value: float | None) -> bool:
        """Whether the trial ``key`` should stop now, at ``step`` with score ``value`` (higher is better).
        As in Tune, the highest rung the trial has reached and not yet been judged at decides."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        for milestone in reversed(self.milestones):
            seen = self.recorded[milestone]
            if step < milestone or key in seen:
                continue
            cutoff = _quantile(list(seen.values()), 1 - 1 / self.rf) if seen else None
            seen[key] = float(value)
            return cutoff is not None and value < cutoff - self.margin
        return False


__all__ = ["Rungs"]
