"""The compute budget of a search: parsing, admission control, and the cost model that predicts trials.

Units: a ``gpu``/``cpu`` budget counts device-seconds of trials (wall seconds x GPUs, or x CPU cores, per
trial: load, train and evaluate); a ``wall`` budget counts the active wall-clock of the search, summed over
controller sessions (downtime between sessions is not counted). Spend is recorded in a
:class:`~allocsearch.study.ledger.Ledger`.

Never overspending: :class:`BudgetKeeper` admits a trial only with a cap, reserved out of the budget until
the trial finishes, and the caps of running trials plus everything spent never exceed the budget. A trial
worker stops itself when its own device-seconds reach its cap (for a wall budget: when the wall seconds
left run out), so the total exceeds the budget by at most the granularity of one training step (plus the
final save) per running trial -- unless a worker's start (imports, model load: not interruptible) alone
outlasts its cap: a cut trial admitted on the model's prior overhead on a machine many times slower
(measured: 0.3 CPU-min, tiny-llama, both cores busy: a 75 s start, 1.27 CPU-min spent).
:class:`CostModel` predicts a trial's wall seconds from finished trials.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

from allocsearch.errors import AllocsearchError
from allocsearch.training.config import TrainConfig
from allocsearch.allocation.model_info import REGISTRY_CONFIGS, ModelInfoError, estimate_params, model_config

ACCEPTED = ("use a number and a unit: 64gpu-h, 90gpu-min, 0.5cpu-h, 3cpu-min (device-hours/minutes of "
            "trials) or 2h, 30min (wall-clock of the search)")
_BUDGET = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:(gpu|cpu)-)?(h|min)", re.IGNORECASE | re.ASCII)
_SCALE = {"h": 3600.0, "min": 60.0}


class BudgetError(AllocsearchError, ValueError):
    """A budget that cannot be parsed, or cannot be spent on this cluster (one line)."""


@dataclass(frozen=True)
class Budget:
    """``unit``: gpu | cpu | wall; ``seconds``: device-seconds (gpu/cpu) or wall seconds; ``text``: canonical."""

    unit: str
    seconds: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``64gpu-h``, ``90gpu-min``, ``0.5cpu-h``, ``3cpu-min``, ``2h``, ``30min`` (any case, spaces ok)."""
        shown = repr(text if len(str(text)) <= 60 else str(text)[:57] + "...")
        match = _BUDGET.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise BudgetError(f"budget {shown} is not understood; {ACCEPTED}")
        number, device, scale = match.group(1), (match.group(2) or "").lower(), match.group(3).lower()
        amount = Decimal(number)
        seconds = float(amount) * _SCALE[scale]
        if amount <= 0 or not math.isfinite(seconds):
            raise BudgetError(f"budget {shown} must be a positive, finite amount; {ACCEPTED}")
        canonical = format(amount.normalize(), "f") + (f"{device}-" if device else "") + scale
        return cls(unit=device or "wall", seconds=seconds, text=canonical)

    @classmethod
    def of_seconds(cls, seconds: float, unit: str) -> Budget:
        """A budget of ``seconds`` (device-seconds, or wall seconds for ``wall``), written in minutes."""
        return cls.parse(f"{seconds / 60:.6f}{'' if unit == 'wall' else unit + '-'}min")

    def _parts(self) -> tuple[str, str]:
        match = _BUDGET.fullmatch(self.text)
        return match.group(1), match.group(3)

    def describe(self) -> str:
        """E.g. ``64 GPU-hours``, ``15 CPU-minutes``, ``2 hours of wall-clock``."""
        number, scale = self._parts()
        word = ("hour" if scale == "h" else "minute") + ("" if Decimal(number) == 1 else "s")
        if self.unit == "wall":
            return f"{number} {word} of wall-clock"
        return f"{number} {self.unit.upper()}-{word}"

    def format(self, seconds: float) -> str:
        """A spend in this budget's unit: ``12.3 GPU-h``, ``14.8 CPU-min``, ``1h 03m`` / ``12m 05s``."""
        if self.unit == "wall":
            total = max(0, round(seconds))
            hours, rest = divmod(total, 3600)
            return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
        _, scale = self._parts()
        value = seconds / _SCALE[scale]
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
        return f"{value:.{digits}f} {self.unit.upper()}-{scale}"

    def to_dict(self) -> dict:
        return {"text": self.text, "unit": self.unit, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> Budget:
        return cls.parse(data["text"])

    def check_resources(self, gpus_per_trial: float, cluster_gpus: float) -> None:
        """Raise a one-line BudgetError when trials cannot run, or a GPU budget could never be spent."""
        if self.unit == "gpu" and cluster_gpus <= 0:
            raise BudgetError(f"a GPU budget ({self.text}) needs GPUs but the cluster has none; use a cpu budget "
                              "such as 0.5cpu-h or run on a cluster with GPUs")
        if self.unit == "gpu" and gpus_per_trial <= 0:
            raise BudgetError(f"a GPU budget ({self.text}) needs GPUs but trials are set to use none; give each "
                              "trial a GPU (gpus_per_trial: 1) or use a cpu budget such as 0.5cpu-h")
        if gpus_per_trial > cluster_gpus:
            raise BudgetError(f"each trial asks for {gpus_per_trial:g} GPUs but the cluster has {cluster_gpus:g}; "
                              f"set gpus_per_trial to at most {cluster_gpus:g}")


def devices_per_trial(unit: str, cpus_per_trial: float, gpus_per_trial: float) -> float:
    """Devices a trial's wall seconds are multiplied by: GPUs (gpu), CPU cores (cpu), 1 (wall)."""
    return {"gpu": float(gpus_per_trial), "cpu": float(cpus_per_trial), "wall": 1.0}[unit]


class BudgetKeeper:
    """Admission control: hands each trial a cap so that spent + reserved caps never exceed the budget.

    Amounts are in budget units: device-seconds for gpu/cpu budgets, wall seconds for wall budgets.
    ``ledger_spent`` is everything the ledger recorded before this keeper was made (this session's clock,
    for wall budgets, starts at construction); ``finish`` takes the spend of that one admission.
    """

    def __init__(self, budget: Budget, ledger_spent: float, *, margin: float = 1.2, room: float = 2.5,
                 clock: Callable[[], float] = time.monotonic):
        if margin < 1 or room < margin:
            raise ValueError(f"margin must be >= 1 and room >= margin, not {margin}, {room}")
        self.budget, self.margin, self.room, self._clock = budget, float(margin), float(room), clock
        self._start = clock()
        self._spent = float(ledger_spent)
        self._caps: dict[int, float] = {}  # running trial -> reserved cap
        self._running: dict[int, float] = {}  # running trial -> spend so far
        self.epsilon = 0.005 * budget.seconds
        self.held = 0.0  # held back from admission (the confirmation phase's reserve, while the search runs)

    @property
    def wall(self) -> bool:
        return self.budget.unit == "wall"

    def admit(self, number: int, predicted: float, first_checkpoint: float, *, running: int,
              whole: bool = False) -> float | None:
        """The trial's cap, reserved now, or None when nothing fits (yet).

        Device budgets: if ``predicted x margin`` is free, a cap of up to ``predicted x room`` (as much as is
        free: a trial slower than predicted -- a busy machine, a slow method -- is not cut while the budget
        has room; what it does not use goes back at ``finish``); else, if ``first_checkpoint`` fits,
        everything free (the trial is cut short by the budget and reports partial results) -- but while
        ``running`` > 0 and the running trials' unused reservations could still make the whole trial fit,
        None (wait: idle time costs no device budget, and a whole trial is worth more than a cut one).
        Wall budgets: the wall seconds left (a deadline) if ``predicted`` or ``first_checkpoint`` fits.
        ``whole``: a run worth nothing cut short (a confirmation run counts only completed) is admitted only
        if ``predicted x margin`` fits (device budgets) or ``predicted`` does (wall); else None.
        """
        if number in self._running:
            raise ValueError(f"trial {number} is already admitted")
        if not (predicted > 0 and first_checkpoint >= 0):
            raise ValueError(f"predicted must be > 0 and first_checkpoint >= 0, not {predicted}, {first_checkpoint}")
        free = self.free()
        if self.wall:
            cap = free if (predicted if whole else min(predicted, first_checkpoint)) <= free and free > 0 else None
        elif predicted * self.margin <= free:
            cap = min(free, predicted * self.room)
        elif first_checkpoint <= free and free > 0 and not whole:
            unused = sum(self._caps[n] - min(self._running[n], self._caps[n]) for n in self._caps)
            cap = None if running > 0 and predicted * self.margin <= free + unused else free
        else:
            cap = None
        if cap is not None:
            self._running[number] = 0.0
            if not self.wall:
                self._caps[number] = cap
        return cap

    def update(self, number: int, spent_so_far: float) -> None:
        """A running trial's spend so far (for status, and to judge what its reservation may give back)."""
        if number in self._running:
            self._running[number] = max(self._running[number], float(spent_so_far))

    def finish(self, number: int, spent: float) -> None:
        """Release the trial's reservation; its actual spend counts from now on."""
        self._running.pop(number, None)
        self._caps.pop(number, None)
        if not self.wall:
            self._spent += float(spent)

    def spent(self) -> float:
        """Spend of finished trials (device budgets) or active wall seconds so far (wall budgets)."""
        return self._spent + (self._clock() - self._start if self.wall else 0.0)

    def in_flight(self) -> float:
        """Spend so far of running trials (device budgets; 0 for wall budgets)."""
        return 0.0 if self.wall else sum(self._running.values())

    def reserved(self) -> float:
        """Sum of the caps of running trials (0 for wall budgets)."""
        return sum(self._caps.values())

    def remaining(self) -> float:
        """Budget minus spent (reservations not subtracted), at least 0."""
        return max(0.0, self.budget.seconds - self.spent())

    def free(self) -> float:
        """What ``admit`` can hand out now: remaining minus reservations and what is held, at least 0."""
        return max(0.0, self.remaining() - self.reserved() - self.held)

    def exhausted(self) -> bool:
        """Less than 0.5% of the budget remains."""
        return self.remaining() < self.epsilon

    def overshoot(self) -> float:
        """How far spend went past the budget (0 if it did not)."""
        return max(0.0, self.spent() - self.budget.seconds)


# (seconds per training step at PRIOR_TOKENS tokens per step, overhead seconds: load + evaluation), on CPU
PRIORS = {"minilm-l6": (0.31, 25.0), "smollm2-135m": (3.4, 60.0), "tiny-llama": (0.02, 12.0)}
PRIOR_TOKENS = {"minilm-l6": 16 * 64, "smollm2-135m": 8 * 256, "tiny-llama": 4 * 64}
DEFAULT_PRIOR = (6.8, 120.0, 8 * 256)  # a model without a readable config: twice SmolLM2's step, 3x its overhead
# step time relative to LoRA, from the layer benchmark (allocsearch bench layers); unknown methods: the slowest
METHOD_FACTORS = {"lora": 1.0, "dora": 1.7, "mola": 1.0, "loracoe": 1.15, "omoe": 1.2, "graphlora": 1.7}
FEATURES = ("method", "steps", "tokens_per_step", "eval_examples")


def _params(name: str) -> float:
    return estimate_params(REGISTRY_CONFIGS[name])


# Other models are scaled from the measured ones by their size (model_info.estimate_params). A step costs a
# fixed part (tiny-llama's whole step: at its size nothing else shows) plus seconds per parameter x token
# (the mean of MiniLM-L6's and SmolLM2-135M's); the overhead grows linearly with the parameters from
# tiny-llama's to SmolLM2-135M's (and on beyond it).
STEP_FIXED_SECONDS = PRIORS["tiny-llama"][0]
SECONDS_PER_PARAM_TOKEN = statistics.mean((PRIORS[n][0] - STEP_FIXED_SECONDS) / (_params(n) * PRIOR_TOKENS[n])
                                          for n in ("minilm-l6", "smollm2-135m"))
OVERHEAD_PER_PARAM = ((PRIORS["smollm2-135m"][1] - PRIORS["tiny-llama"][1])
                      / (_params("smollm2-135m") - _params("tiny-llama")))


def prior_for(model: str, tokens_per_step: int) -> tuple[float, float]:
    """(step seconds at ``tokens_per_step`` tokens per step, overhead seconds) for a model: measured for a
    registry name, scaled by size from its config for any other model (``DEFAULT_PRIOR`` without one)."""
    key = str(model).lower()
    if key in PRIORS:
        step, overhead = PRIORS[key]
        return step * tokens_per_step / PRIOR_TOKENS[key], overhead
    try:
        params = estimate_params(model_config(str(model)))
    except ModelInfoError:
        params = None
    if params is None:
        step, overhead, ref = DEFAULT_PRIOR
        return step * tokens_per_step / ref, overhead
    overhead = PRIORS["tiny-llama"][1] + OVERHEAD_PER_PARAM * max(0.0, params - _params("tiny-llama"))
    return STEP_FIXED_SECONDS + SECONDS_PER_PARAM_TOKEN * params * tokens_per_step, overhead


class CostModel:
    """Predicts a trial's wall seconds before it starts, learning from finished trials.

    wall = overhead + steps x step_seconds x tokens_per_step / ref_tokens x factor[method]. Features:
    ``{"method", "steps", "tokens_per_step" (batch_size x max_length x grad_accum), "eval_examples"}``
    (``eval_examples`` is carried but not yet modelled: evaluation is part of the overhead). Until a trial
    is observed the priors and METHOD_FACTORS hold; then step_seconds is the median observed step time
    (normalised by tokens and the table's factor), overhead the median of wall - train seconds, and a
    method's factor the median ratio of its own step times to step_seconds. Trials stopped before their
    final evaluation (pruned, capped) teach the step time only: their wall lacks part of the overhead.
    """

    def __init__(self, prior_step_seconds: float, prior_overhead_seconds: float, *, ref_tokens: int = 1024):
        self.prior_step_seconds, self.prior_overhead_seconds = float(prior_step_seconds), float(prior_overhead_seconds)
        self.ref_tokens = int(ref_tokens)
        self._observations: list[dict] = []
        self._fit()

    @classmethod
    def for_model(cls, model: str, tokens_per_step: int) -> CostModel:
        """Priors of ``model`` (``prior_for``), with ``ref_tokens=tokens_per_step``."""
        return cls(*prior_for(model, tokens_per_step), ref_tokens=tokens_per_step)

    @property
    def n_observed(self) -> int:
        return len(self._observations)

    def observe(self, features: dict, wall_seconds: float, steps_done: int, train_seconds: float, *,
                complete: bool = True) -> None:
        """Learn from a finished (or stopped) trial: its wall seconds, steps run and training seconds.
        ``complete``: it ran its final evaluation, so its wall minus training is a whole overhead."""
        _check(features)
        self._observations.append({"features": dict(features), "wall_seconds": float(wall_seconds),
                                   "steps_done": int(steps_done), "train_seconds": float(train_seconds),
                                   "complete": bool(complete)})
        self._fit()

    def _fit(self) -> None:
        self.factors = dict(METHOD_FACTORS)
        self.step_seconds, self.overhead_seconds = self.prior_step_seconds, self.prior_overhead_seconds
        if not self._observations:
            return
        whole = [o["wall_seconds"] - o["train_seconds"] for o in self._observations if o.get("complete", True)]
        if whole:
            self.overhead_seconds = max(0.0, statistics.median(whole))
        rates: dict[str, list[float]] = {}  # method -> step seconds at ref_tokens
        for o in self._observations:
            if o["steps_done"] > 0 and o["train_seconds"] > 0:
                f = o["features"]
                rate = o["train_seconds"] / o["steps_done"] * self.ref_tokens / f["tokens_per_step"]
                rates.setdefault(f["method"], []).append(rate)
        if not rates:
            return
        self.step_seconds = statistics.median(r / self._factor(m) for m, rs in rates.items() for r in rs)
        for method, rs in rates.items():
            self.factors[method] = statistics.median(rs) / self.step_seconds

    def _factor(self, method: str) -> float:
        return self.factors.get(method, max(METHOD_FACTORS.values()))

    def step_cost(self, features: dict) -> float:
        """Predicted seconds of one training step."""
        _check(features)
        return self.step_seconds * features["tokens_per_step"] / self.ref_tokens * self._factor(features["method"])

    def predict(self, features: dict) -> float:
        """Predicted wall seconds of the whole trial."""
        return self.overhead_seconds + features["steps"] * self.step_cost(features)

    def predict_to_step(self, features: dict, step: int) -> float:
        """Predicted wall seconds to reach checkpoint ``step``: the whole overhead (conservative) + steps."""
        return self.overhead_seconds + min(step, features["steps"]) * self.step_cost(features)

    def to_dict(self) -> dict:
        return {"prior_step_seconds": self.prior_step_seconds, "prior_overhead_seconds": self.prior_overhead_seconds,
                "ref_tokens": self.ref_tokens, "observations": [dict(o) for o in self._observations]}

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        model = cls(data["prior_step_seconds"], data["prior_overhead_seconds"], ref_tokens=data["ref_tokens"])
        model._observations = [dict(o) for o in data.get("observations", [])]
        model._fit()
        return model


def _check(features: dict) -> None:
    missing = [k for k in FEATURES if k not in features]
    if missing:
        raise ValueError(f"cost features lack {', '.join(missing)}; expected {', '.join(FEATURES)}")
    if not (features["steps"] >= 0 and features["tokens_per_step"] > 0):
        raise ValueError(f"cost features need steps >= 0 and tokens_per_step > 0, not {features}")


def tokens_per_step(train: dict) -> int:
    """Tokens one optimizer step trains on: batch x max length x gradient accumulation."""
    d = TrainConfig
    return (int(train.get("batch_size", d.batch_size)) * int(train.get("max_length", d.max_length))
            * int(train.get("grad_accum", d.grad_accum)))


def trial_features(spec: dict) -> dict:
    """What the cost model predicts a trial from (its spec): method, steps, tokens per step, eval examples."""
    train = spec["train"]
    return {"method": spec["allocation"].get("method", "lora"), "steps": int(train.get("steps", TrainConfig.steps)),
            "tokens_per_step": tokens_per_step(train), "eval_examples": int(train.get("eval_examples") or 0)}
