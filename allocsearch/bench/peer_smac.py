"""SMAC3 as a peer (``smac:mf``): its ``MultiFidelityFacade`` (a random forest over configurations, Hyperband
over training steps: BOHB's scheme) driven by ask and tell, as SMAC's users write the loop.

The search space: SMAC reads a ``ConfigSpace``; this one is built from the table's configurations (every
parameter a categorical over the values the table holds; a method's parameters active only under that
method), which is the table's finite space. The fidelity: SMAC asks for a configuration at a budget in steps
(``min_budget`` = the first checkpoint, ``max_budget`` = the trial's steps); the trial runs to the first
checkpoint at or past it and is told ``1 - score`` (SMAC minimises a cost). A configuration SMAC promotes
to a larger budget starts again from step 0, as SMAC's Hyperband does (no checkpoint is resumed). It
exports SMAC's incumbent. A draw that trains nothing is told crashed.
"""
from __future__ import annotations

import tempfile
import warnings

from allocsearch.study.confidence import config_key


class SmacAgent:
    def __init__(self, plan: dict, space, layers: int, table, seed: int):
        from smac import MultiFidelityFacade, Scenario

        first, steps = table.fidelity()
        self.cs, self.values = config_space([next(iter(by.values())).params for by in table.runs.values()], seed)
        self.tmp = tempfile.TemporaryDirectory(prefix="as-smac-")
        scenario = Scenario(self.cs, deterministic=True, n_trials=10 ** 9, seed=seed, min_budget=first,
                            max_budget=steps, output_directory=self.tmp.name, name=f"peer-{seed}")
        intensifier = MultiFidelityFacade.get_intensifier(scenario)
        self.smac = MultiFidelityFacade(scenario, lambda config, seed=0, budget=None: 0.0,  # ask and tell only
                                        intensifier=intensifier, overwrite=True, logging_level=40)
        self.space, self.layers = space, layers

    def suggest(self, trial_id: str):
        from smac.main.exceptions import ConfigurationSpaceExhaustedException

        try:
            with warnings.catch_warnings():  # SMAC's local search logs np.mean of its timings, an empty list when
                warnings.simplefilter("ignore", RuntimeWarning)  # it searched nothing: numpy's "Mean of empty
                info = self.smac.ask()  # slice" (local_search.py, SMAC 2.4.1) on the user's terminal otherwise
        except (ConfigurationSpaceExhaustedException, StopIteration):
            return None  # every configuration at every budget it wants has run (or its generator ended)
        return info, self._params(info.config)

    def _params(self, config) -> dict:
        return native_params(self.values, config)

    def report(self, info, step: int, value: float) -> bool:
        return step < (info.budget or 0)  # on to the first checkpoint at or past its budget

    def complete(self, info, step: int, value: float) -> None:
        from smac.runhistory.dataclasses import TrialValue

        self.smac.tell(info, TrialValue(cost=1.0 - value), save=False)

    stopped = complete  # its budget reached: a complete run at that fidelity

    def cut(self, info, step: int | None, value: float | None) -> None:
        pass  # killed at the deadline: SMAC hears nothing more

    def fail(self, info) -> None:
        from smac.runhistory.dataclasses import TrialValue
        from smac.runhistory.enumerations import StatusType

        self.smac.tell(info, TrialValue(cost=1.0, status=StatusType.CRASHED), save=False)

    def best(self) -> str | None:
        """SMAC's incumbent; one that trains nothing (told crashed, it can lead before anything else reached
        the top budget) is no export."""
        for config in self.smac.intensifier.get_incumbents():
            params = self._params(config)
            if not self.space.trains_nothing(params, self.layers):
                return config_key(params)
        return None


def config_space(configs: list[dict], seed: int):
    """A ConfigSpace over the table's configurations: a categorical per parameter over its values; under a
    ``method`` parameter, each ``<method>.x`` active only when ``method`` is that method."""
    from ConfigSpace import Categorical, ConfigurationSpace, EqualsCondition

    values = table_values(configs)
    cs = ConfigurationSpace(seed=seed)
    hps = {k: Categorical(k, [_native(v) for v in vs]) for k, vs in values.items()}
    cs.add(list(hps.values()))
    if "method" in hps:
        cs.add([EqualsCondition(hp, hps["method"], k.split(".", 1)[0]) for k, hp in hps.items()
                if "." in k and k.split(".", 1)[0] in values["method"]])
    return cs, values


def table_values(configs: list[dict]) -> dict[str, list]:
    """Each parameter the configurations hold, with its values in the order first seen."""
    values: dict[str, list] = {}
    for params in configs:
        for k, v in params.items():
            if v not in values.setdefault(k, []):
                values[k].append(v)
    return values


def native_params(values: dict, config) -> dict:
    """A configuration read back from ConfigSpace (numpy scalars) as the table's own values."""
    return {k: values[k][values[k].index(v)] if k in values else v for k, v in dict(config).items()}


def _native(v):
    return v if isinstance(v, (int, float, str)) else str(v)


__all__ = ["SmacAgent", "config_space", "native_params", "table_values"]
