"""What ``start`` shows while it runs and what ``start`` / ``status`` print at the end.

On a terminal a live panel (budget bar, trials by state, best so far with its allocation drawn as a
per-layer sparkline); off a terminal (logs, CI) one plain line per event. Progress goes to stderr so
``--json`` output on stdout stays clean.
"""
from __future__ import annotations

import sys
import time

from allocsearch.study.confidence import finalist_mark
from allocsearch.study.folder import trial_dir
from allocsearch.study.records import State
from allocsearch.search.budget import Budget
from allocsearch.search.rungs import EVIDENCE_PAIRS, EVIDENCE_RHO

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[int] | None) -> str:
    """Experts per layer as bars, input side first: the MoLA diagrams' shape in one line."""
    if not values:
        return ""
    top = max(values)
    return "".join(BARS[min(len(BARS) - 1, round((v / top) * (len(BARS) - 1)))] if top else BARS[0] for v in values)


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    return "█" * full + "░" * (width - full)


class LiveView:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.budget: Budget | None = None
        self.spent = 0.0
        self.counts = {state: 0 for state in (State.RUNNING, State.COMPLETED, State.PRUNED, State.FAILED)}
        self.trials: dict[int, dict] = {}
        self.best: dict | None = None
        self.lines: list[str] = []
        self.title = ""
        self._live = None
        self._t0 = time.monotonic()

    # --------------------------------------------------------------------------------- events
    def event(self, kind: str, **d) -> None:
        if not self.enabled:
            return
        line = None
        if kind == "study":
            self.budget = Budget.from_dict(d["budget"]) if isinstance(d["budget"], dict) else Budget.parse(d["budget"])
            self.spent = d["spent"]
            self.title = f"study {d['study']} ({d['root']})"
            rec = d.get("recovered") or {}
            line = f"{self.title}: budget {self.budget.describe()}, spent so far {self.budget.format(self.spent)}"
            if rec.get("recovered"):
                line += f"; resumed: {len(rec['recovered'])} trial(s) that had ended recorded from their results"
            if rec.get("crashed") or rec.get("not_started"):
                line += (f"; resumed: {len(rec.get('crashed', []))} trial(s) left running by a stopped controller "
                         f"marked failed, {len(rec.get('retried', []))} retried")
        elif kind == "cluster":
            line = f"ray: {d['cpus']:g} CPUs, {d['gpus']:g} GPUs"
        elif kind == "admitted":
            self.trials[d["number"]] = {"summary": d["summary"], "experts": d.get("experts")}
            again = f", confirming trial {d['confirm']} on seed {d['seed']}" if d.get("confirm") is not None else ""
            line = f"trial {d['number']}: {d['summary']} (predicted {self._fmt(d['predicted'])}{again})"
        elif kind == "started":
            self.counts["running"] += 1
        elif kind == "checkpoint":
            if d.get("objective") is not None:
                line = f"trial {d['number']}: step {d['step']} validation {d['objective']:.3f}"
        elif kind == "finished":
            self.counts["running"] = max(0, self.counts["running"] - 1)
            self.counts[d["state"]] = self.counts.get(d["state"], 0) + 1
            obj = f" {d['objective']:.3f}" if d.get("objective") is not None else ""
            why = f" ({d['reason']})" if d.get("reason") else ""
            line = f"trial {d['number']}: {d['state']}{obj}{why}, {self._fmt(d['spend'])}"
            self.best = d.get("best") or self.best  # the study's best, as the controller named it
        elif kind == "tick":
            self.spent = d["spent"]
        elif kind == "stopping" and d.get("signal"):
            line = (f"{d['signal']}: stopping {d['running']} running trial(s) now, each recorded with its last "
                    f"checkpoint (again to end at once)")
        elif kind == "stopping":
            line = f"stop requested: {d['running']} running trial(s) stop at their next checkpoint"
        elif kind == "oom_retry":
            line = (f"trial {d['number']}: out of memory; its configuration runs again with batch {d['batch_size']} "
                    f"x {d['grad_accum']} accumulation")
        elif kind == "confirming" and not d.get("ended"):
            line = (f"confirmation phase: {len(d['finalists'])} finalists re-run on fresh seeds, raced against the "
                    f"best ({self._fmt(d['reserve'])} left for it)")
        elif kind == "confirming":
            line = f"no confirmation phase ({d['ended']}): the reserve goes back to the search"
            if d.get("needed_budget"):
                line += (f"; the winner will be a single-seed pick (a budget of about "
                         f"{self._fmt(d['needed_budget'])} pays for a confirmation run)")
        elif kind == "ray_logs_kept":
            line = f"a trial failed: Ray's worker logs are kept in {d['path']}"
        if line:
            self._emit(line)
        if self.tty:
            self._refresh()

    def _fmt(self, seconds: float) -> str:
        return self.budget.format(seconds) if self.budget else f"{seconds:.0f} s"

    def _emit(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self._t0:7.1f}s]"
        if self.tty:
            self.lines = (self.lines + [f"{stamp} {line}"])[-8:]
        else:
            print(f"{stamp} {line}", file=self.stream, flush=True)

    # --------------------------------------------------------------------------------- the panel
    def panel_text(self) -> str:
        frac = self.spent / self.budget.seconds if self.budget and self.budget.seconds else 0.0
        c = self.counts
        text = [self.title,
                f"budget  {bar(frac)} {self._fmt(self.spent)} of {self.budget.text if self.budget else '?'} "
                f"({100 * frac:.0f}%)",
                f"trials  {c['running']} running · {c['completed']} complete · {c['pruned']} pruned · "
                f"{c['failed']} failed" + (f" · {c['oom']} out of memory" if c.get("oom") else "")]
        if self.best:
            seeds = f" (mean of {self.best['n']} seeds)" if self.best["n"] > 1 else ""
            text.append(f"best    #{self.best['trial']} {self.best['value']:.4f}{seeds}  {self.best.get('summary', '')}")
            if self.best.get("experts"):
                text.append(f"        experts per layer {sparkline(self.best['experts'])}")
        return "\n".join(text + [""] + self.lines)

    def _refresh(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        if self._live is None:
            self._live = Live(Text(self.panel_text()), console=Console(file=self.stream), refresh_per_second=4,
                              transient=False)
            self._live.start()
        self._live.update(Text(self.panel_text()))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


# ------------------------------------------------------------------------------------- summaries
def render_evidence(ev: dict | None, *, confirm: float | None = None, running: bool = False) -> list[str]:
    """The finalists' mean +- 95% CI over seeds and the configurations tied with the winner; ``confirm``:
    the study's confirmation share (None: not known), ``running``: whether its search is still going."""
    if not ev or max(f["n"] for f in ev["finalists"]) < 2:
        if ev and ev["noise"] is None and len(ev["tied"]) > 0:
            if confirm is not None and not confirm:
                why = "confirmation was off: --confirm 0.2 re-runs the finalists on fresh seeds"
            elif running or confirm is None:
                why = "the confirmation phase re-runs the finalists before the search ends"
            else:  # the search ended without one (the reserve was too small or had one configuration to race)
                why = "the search ran no confirmation run: a resume with a larger --budget pays for one"
            return [f"        single-seed scores, no seed noise measured: the best may be a lucky seed ({why})"]
        return []
    noise = f"seed noise (std) {ev['noise']:.4f}" if ev["noise"] is not None else "no seed noise measured"
    lines = [f"finalists (mean +- 95% CI over seeds; {noise})"]
    for f in ev["finalists"]:
        ci = f" +- {f['ci95']:.4f}" if f.get("ci95") is not None else ""
        mark = finalist_mark(f, ev)
        lines.append(f"  {mark:<12} {f['mean']:.4f}{ci} (n={f['n']}, trials {','.join(map(str, f['trials']))})  "
                     f"{f.get('summary', '')}")
    tied = len(ev["tied"])
    lines.append(f"        {tied} configuration{'s' if tied != 1 else ''} statistically tied with the winner"
                 if tied else "        the winner is separated from every other configuration")
    return lines


def _size(choice: dict) -> str:
    """``2.36M trainable, 0.21 s/step`` of a ``choice.Best`` (what is known of it)."""
    parts = []
    if choice.get("trainable_params"):
        parts.append(f"{choice['trainable_params'] / 1e6:.2f}M trainable")
    if choice.get("step_seconds"):
        parts.append(f"{choice['step_seconds']:.3f} s/step")
    return ", ".join(parts) or "size unknown"


def _the_other_choice(s: dict) -> list[str]:
    """The configuration the other ``--prefer`` would export, when it is another one: the cheapest of those
    tied with the winner (its size against the best's), or, when the study prefers the cheapest, the winner."""
    best, cheap, ev = s.get("best"), s.get("cheapest"), s.get("evidence")
    if not best or not cheap:
        return []
    if s.get("prefer") == "cheapest":
        win = (ev or {}).get("winner")
        if not win or win["trials"][0] == best["trial"]:
            return []
        return [f"        the cheapest of those tied with the best mean: trial {win['trials'][0]} {win['mean']:.4f} "
                f"(n={win['n']})  {win.get('summary', '')} (--prefer best)"]
    if cheap["trial"] == best["trial"]:
        return []
    seeds = f" (mean of {cheap['n']} seeds)" if cheap["n"] > 1 else " (1 seed)"
    return [f"cheapest trial {cheap['trial']}: {cheap['value']:.4f}{seeds}  {cheap['summary']}",
            f"        {_size(cheap)}; statistically tied with the best (--prefer cheapest exports it)"]


def render_summary(s: dict, final: bool) -> str:
    b = s["budget"]
    budget = Budget(unit=b["unit"], seconds=b["total"], text=b["text"])
    c = s["counts"]
    lines = [f"study {s['study']}  ({s['root']})  model {s['model']}  objectives {','.join(s['objectives'])}"]
    running = f"  controller running (pid {s['controller_pid']})" if s.get("controller_pid") else ""
    lines.append(f"budget  {bar(b['fraction'] or 0)} {budget.format(b['spent'])} of {b['text']} "
                 f"({100 * (b['fraction'] or 0):.1f}%)" + (f", overshoot {budget.format(b['overshoot'])}"
                                                          if b["overshoot"] > 0 else ", no overshoot") + running)
    if b.get("predicted_per_trial"):
        lines.append(f"        predicted per trial {budget.format(b['predicted_per_trial'])}")
    lines.append("trials  " + " · ".join(f"{n} {state.replace('_', ' ')}" for state, n in c.items() if n)
                 if any(c.values()) else "trials  none yet")
    best = s.get("best")
    if best:
        over = f" (mean of {best['n']} seeds)" if best["n"] > 1 else ""
        lines.append(f"best    trial {best['trial']}: {best['value']:.4f}{over}  {best['summary']}")
        if best.get("trainable_params") or best.get("step_seconds"):
            lines.append(f"        {_size(best)}")
        if best.get("experts"):
            lines.append(f"        experts per layer {sparkline(best['experts'])}  {best['experts']}")
        base = s.get("baseline")
        if base and base["trial"] != best["trial"]:
            seeds = f" (mean of {base['n']} seeds)" if base["n"] > 1 else ""
            lines.append(f"        vs the LoRA prior (trial {base['trial']}): {base['value']:.4f}{seeds} "
                         f"({best['value'] - base['value']:+.4f})")
        lines.append(f"        files: {trial_dir(s['root'], best['trial'])}")
        lines += _the_other_choice(s)
    elif final:
        lines.append("best    no trial completed")
    lines += render_evidence(s.get("evidence"), confirm=s.get("confirm"), running=bool(s.get("controller_pid")))
    if s.get("rungs"):
        lines.append("stopping " + " · ".join(
            f"step {r['step']}: Spearman {r['rho']:+.2f} over {r['n']} completed" if r["rho"] is not None
            else f"step {r['step']}: {r['n']} completed" for r in s["rungs"])
            + f" (a rung stops trials once its checkpoint ranks >= {EVIDENCE_PAIRS} completed trials as their "
              f"ends, Spearman >= {EVIDENCE_RHO:+.2f})")
    for t in s.get("pareto") or []:
        lines.append(f"pareto  trial {t['number']}: " + ", ".join(f"{v:.4g}" for v in t["values"]) +
                     f"  {t['summary']}")
    if not final:
        top = sorted((t for t in s["trials"] if t["objective"] is not None), key=lambda t: -t["objective"])[:10]
        if top:
            lines.append("top trials")
        for t in top:
            lines.append(f"  {t['number']:>4} {t['state']:<9} {t['objective']:.4f}  {t['summary']}")
    if s.get("end_reason"):
        lines.append(f"ended   {s['end_reason']}")
    return "\n".join(lines)
