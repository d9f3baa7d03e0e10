"""Early stopping that respects seed noise: asynchronous successive halving (ASHA, Li et al. 2020) with a
noise margin. Pure Python, so the live search (through Ray Tune, ``executor.RungScheduler``) and the replay
on a simulated clock (``allocsearch.bench.replay``) stop trials by the very same rule.

Rungs sit at ``grace x rf^k`` steps up to ``max_t`` (Tune's ``ASHAScheduler`` with one bracket). A trial
reaching a rung is compared with the scores recorded there before it: the cutoff is their
``(1 - 1/rf)`` quantile (the median for rf = 2), Tune's rule. ASHA stops the trial when its score is below
the cutoff; here it is stopped only when it is below ``cutoff - margin``: a checkpoint within the measured
seed noise of the cutoff is no evidence that the configuration is worse (margin 0 is Tune's ASHA).

A rung also has to show that it ranks trials as their ends do before it stops any (``min_pairs`` > 0):
over the trials that completed after being recorded there, the Spearman correlation of their rung score
with their final score must reach ``min_rho``, on at least ``min_pairs`` of them; until then a trial is
recorded at the rung and goes on. ASHA's premise is that an early checkpoint predicts the end, and it does
not always hold: on the recorded SST-2 table every lr 1e-3 run still sits at chance (0.50) at step 25, the
first rung, yet those runs end among the best (Spearman of step 25 with the final score: -0.17 over 99
runs; step 50: 0.43). ASHA at that rung stops the best learning rate first.
"""
from __future__ import annotations

import math


EVIDENCE_PAIRS, EVIDENCE_RHO = 5, 0.5  # what a search's rungs must show before they stop trials (see above)


def _quantile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, as Tune's ``np.nanpercentile`` computes the cutoff."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when either side is constant."""
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


class Rungs:
    def __init__(self, max_t: int, grace_period: int, reduction_factor: float = 2.0, margin: float = 0.0,
                 min_pairs: int = 0, min_rho: float = 0.5):
        if grace_period < 1 or max_t < grace_period or reduction_factor <= 1 or margin < 0 or min_pairs < 0:
            raise ValueError(f"bad rungs: max_t {max_t}, grace {grace_period}, rf {reduction_factor}, margin {margin}, "
                             f"min_pairs {min_pairs}")
        self.rf, self.margin = float(reduction_factor), float(margin)
        self.min_pairs, self.min_rho = int(min_pairs), float(min_rho)
        count = int(math.log(max_t / grace_period) / math.log(self.rf) + 1 + 1e-9)
        self.milestones = [grace_period * self.rf ** k for k in range(count)]
        self.recorded: dict[float, dict] = {m: {} for m in self.milestones}
        self.finals: dict = {}  # trial -> its final score (trials that completed)

    def final(self, key, value: float | None) -> None:
        """A trial completed with ``value``: evidence of how well each rung predicts the end."""
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.finals[key] = float(value)

    def trusted(self, milestone: float) -> bool:
        """Whether the rung has shown that it ranks trials as their final scores do (see the module)."""
        if not self.min_pairs:
            return True
        seen = self.recorded[milestone]
        pairs = [(seen[k], v) for k, v in self.finals.items() if k in seen]
        rho = spearman(pairs) if len(pairs) >= self.min_pairs else None
        return rho is not None and rho >= self.min_rho

    def restore(self, history) -> "Rungs":
        """Resume with what earlier sessions' trials showed: ``history`` is (trial, {step: checkpoint},
        final score or None) for every trial that could be judged at a rung (no confirmation run); each is
        recorded where ``stop`` would have recorded it, so a resumed search's rungs go on from the same
        cutoffs and the same evidence (``agreement``, which ``status`` prints, reads the same records)."""
        for key, checkpoints, final in history:
            for m, value in self.judged_at(checkpoints).items():
                self.recorded[m].setdefault(("restored", key), value)
            if final is not None:
                self.final(("restored", key), final)
        return self

    def judged_at(self, checkpoints: dict) -> dict:
        """The rung each checkpoint of a trial would be recorded at ({milestone: value}): at each report,
        the highest rung reached and not yet judged (Tune's rule, as ``stop``)."""
        out: dict = {}
        for step in sorted(checkpoints, key=float):
            m = max((m for m in self.milestones if float(step) >= m and m not in out), default=None)
            if m is not None and checkpoints[step] is not None:
                out[m] = float(checkpoints[step])
        return out

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
            return cutoff is not None and value < cutoff - self.margin and self.trusted(milestone)
        return False


def agreement(trials) -> list[dict]:
    """What a study's records say of its rungs: for each rung before the end, the Spearman correlation of
    the completed trials' checkpoint there with their final score (the evidence ``Rungs.trusted`` decides
    on; confirmation runs are never judged at a rung, so they are left out). ``trials``: the study's
    ``TrialRecord`` s."""
    done = [t for t in trials if t.completed and t.confirm_of is None and t.intermediate]
    if not done:
        return []
    steps = sorted({int(k) for t in done for k in t.intermediate})
    max_t = max(int(t.steps or steps[-1]) for t in done)
    rungs = Rungs(max(max_t, steps[0]), steps[0])
    judged = [(rungs.judged_at(t.intermediate), t.objective) for t in done]
    out = []
    for m in (m for m in rungs.milestones if m < max_t):
        pairs = [(at[m], final) for at, final in judged if m in at]
        out.append({"step": int(m), "n": len(pairs), "rho": spearman(pairs) if len(pairs) >= 2 else None})
    return out


__all__ = ["EVIDENCE_PAIRS", "EVIDENCE_RHO", "Rungs", "agreement", "spearman"]
