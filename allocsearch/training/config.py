"""A trial's training settings (``train:`` in a trial config), validated, each default written once; torch-free,
so the controller and the search space read them without loading torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from allocsearch.errors import AllocsearchError


class TrainConfigError(AllocsearchError, ValueError):
    pass


@dataclass
class TrainConfig:
    steps: int = 60  # optimizer steps
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    max_length: int = 256
    eval_every: int = 0  # fidelity checkpoints on validation every N steps (0: only at the end)
    eval_examples: int | None = None  # cap on validation examples at checkpoints (the final eval uses all)
    eval_batch_size: int = 16
    phase_fraction: float = 0.5  # two-phase methods (LoRACoE): share of steps in the LoRA warm-up
    joint_lr_scale: float = 0.25  # ... and the joint phase's lr factor (paper: 5e-5 after 2e-4)
    max_new_tokens: int = 16  # generation tasks (GSM8K)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA with bf16, else fp32; fp16 trains with a GradScaler
    threads: int | None = None  # torch CPU threads (from the trial's resources)
    evaluate_test: bool = True  # final evaluation on the test split (reports only, never for choices)
    test_at_checkpoints: bool = False  # also the test split at each checkpoint (benchmark tables' curves)
    zero_shot: bool = False  # also evaluate the untrained model (validation and test)

    def __post_init__(self):
        self._check_types()
        positive = ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"train.{name} must be a whole number >= 1, got {value!r}")
        if not self.lr > 0:
            raise TrainConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise TrainConfigError(f"train.schedule {self.schedule!r}: use cosine, linear or constant")
        for name in ("warmup_ratio", "phase_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eval_every < 0 or (self.eval_examples is not None and self.eval_examples < 1):
            raise TrainConfigError("train.eval_every must be >= 0 and train.eval_examples >= 1 or null")
        if self.threads is not None and self.threads < 1:
            raise TrainConfigError(f"train.threads must be >= 1 or null, got {self.threads}")

    def _check_types(self) -> None:
        """Every setting has its type: one line naming the key, the expected type and the value. Numbers
        written as strings (``"1e-3"`` from JSON) are accepted where a float is expected."""
        import numbers

        from allocsearch.allocation.values import typed

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _WHOLE and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                continue  # the range check below names it: "must be a whole number >= 1"
            setattr(self, f.name, typed(f"train.{f.name}", str(f.type), value, TrainConfigError,
                                        integral_floats=True))

    @classmethod
    def from_dict(cls, data: dict | None) -> "TrainConfig":
        if data is not None and not isinstance(data, dict):
            raise TrainConfigError(f"train: expected a mapping of settings (e.g. {{steps: 60, lr: 3.0e-4}}), "
                                   f"got {data!r:.60}")
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainConfigError(f"unknown train setting(s) {unknown}: known settings are {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


_WHOLE = ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens")
