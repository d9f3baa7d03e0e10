"""Budget parsing, the spend ledger, admission control and the cost model (pure Python, fast)."""
from __future__ import annotations

import json
import random
import sys

import pytest

from allocsearch.errors import AllocsearchError
from allocsearch.search.budget import (
    PRIORS,
    Budget,
    BudgetError,
    BudgetKeeper,
    CostModel,
    devices_per_trial,
    prior_for,
)
from allocsearch.study.ledger import Ledger


# -- Budget ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, unit, seconds, canonical", [
    ("64gpu-h", "gpu", 64 * 3600, "64gpu-h"),
    ("90gpu-min", "gpu", 90 * 60, "90gpu-min"),
    ("0.5cpu-h", "cpu", 1800, "0.5cpu-h"),
    ("3cpu-min", "cpu", 180, "3cpu-min"),
    ("2h", "wall", 7200, "2h"),
    ("30min", "wall", 1800, "30min"),
    (".5cpu-h", "cpu", 1800, "0.5cpu-h"),
    ("1.5GPU-H", "gpu", 5400, "1.5gpu-h"),
    ("  64Gpu-H\t\n", "gpu", 64 * 3600, "64gpu-h"),
    ("064.50cpu-min", "cpu", 64.5 * 60, "64.5cpu-min"),
    ("100gpu-h", "gpu", 100 * 3600, "100gpu-h"),
])
def test_parse_valid(text, unit, seconds, canonical):
    budget = Budget.parse(text)
    assert (budget.unit, budget.seconds, budget.text) == (unit, pytest.approx(seconds), canonical)
    assert Budget.parse(budget.text) == budget
    assert Budget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget


@pytest.mark.parametrize("text", ["64gpu-hours", "-3gpu-h", "0gpu-h", "0.0h", "banana", "inf", "nan", "infgpu-h",
                                  "nangpu-h", "", "   ", "64", "gpu-h", "1e3gpu-h", "64tpu-h", "64gpu-h 2h",
                                  "6 4gpu-h", "x\ny", "9" * 400 + "gpu-h", None])
def test_parse_invalid_is_one_line(text):
    with pytest.raises(BudgetError) as info:
        Budget.parse(text)
    message = str(info.value)
    assert "\n" not in message and "64gpu-h, 90gpu-min, 0.5cpu-h, 3cpu-min" in message and "2h, 30min" in message
    assert isinstance(info.value, AllocsearchError) and isinstance(info.value, ValueError)


def test_parse_message_names_the_input():
    with pytest.raises(BudgetError, match=r"^budget 'banana' is not understood; use a number and a unit: "):
        Budget.parse("banana")


def test_describe_and_format():
    assert Budget.parse("64gpu-h").describe() == "64 GPU-hours"
    assert Budget.parse("15cpu-min").describe() == "15 CPU-minutes"
    assert Budget.parse("1gpu-h").describe() == "1 GPU-hour"
    assert Budget.parse("2h").describe() == "2 hours of wall-clock"
    assert Budget.parse("30MIN").describe() == "30 minutes of wall-clock"
    assert Budget.parse("64gpu-h").format(12.3 * 3600) == "12.3 GPU-h"
    assert Budget.parse("30cpu-min").format(14.8 * 60) == "14.8 CPU-min"
    assert Budget.parse("0.5cpu-h").format(90) == "0.03 CPU-h"
    assert Budget.parse("2h").format(3780) == "1h 03m"
    assert Budget.parse("30min").format(725) == "12m 05s"


def test_check_resources():
    Budget.parse("64gpu-h").check_resources(1, 8)
    Budget.parse("0.5cpu-h").check_resources(0, 0)
    Budget.parse("2h").check_resources(0.5, 1)
    for gpus, cluster in ((1, 0), (0, 0), (0, 4)):
        with pytest.raises(BudgetError, match="^a GPU budget \\(64gpu-h\\) needs GPUs") as info:
            Budget.parse("64gpu-h").check_resources(gpus, cluster)
        assert "\n" not in str(info.value) and "cpu budget such as 0.5cpu-h" in str(info.value)
    with pytest.raises(BudgetError, match="asks for 2 GPUs but the cluster has 1"):
        Budget.parse("2h").check_resources(2, 1)


def test_devices_per_trial():
    assert devices_per_trial("gpu", 4, 0.5) == 0.5
    assert devices_per_trial("cpu", 4, 0.5) == 4
    assert devices_per_trial("wall", 4, 2) == 1


# -- Ledger ----------------------------------------------------------------------------------------------
def test_ledger_arithmetic_and_persistence(tmp_path):
    path = tmp_path / "study" / "ledger.jsonl"
    ledger = Ledger(path)
    assert ledger.spent("gpu") == 0 and ledger.trial_spend() == {} and ledger.next_session() == 0
    ledger.record_trial(0, 10, 2)
    ledger.record_trial(1, 5, 1)
    ledger.record_trial(0, 30, 2)
    ledger.record_trial(0, 20, 2)  # out of order: the max counts
    ledger.record_trial(1, 8, 1, final=True)
    assert ledger.trial_spend() == {0: 60, 1: 8}
    assert ledger.spent("gpu") == ledger.spent("cpu") == 68
    assert ledger.finished_trials() == {1}
    ledger.record_trial(0, 35, 2, final=True)
    assert ledger.spent("gpu") == 78 and ledger.finished_trials() == {0, 1}
    assert [r["kind"] for r in ledger.records()] == ["trial"] * 6
    again = Ledger(path)
    assert again.trial_spend() == ledger.trial_spend() and again.finished_trials() == {0, 1}
    assert again.spent("gpu") == 78 and again.records() == ledger.records()
    with pytest.raises(ValueError):
        ledger.spent("tpu")
    for bad in ((-1, 1, 1), (0, -1, 1), (0, float("nan"), 1), (0, 1, float("inf"))):
        with pytest.raises(ValueError):
            ledger.record_trial(*bad)


def test_ledger_trial_rerun_in_a_later_session_adds(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record_trial(3, 100, 1, session=0)  # killed mid-trial
    ledger.record_trial(3, 40, 1, session=1)  # re-run from scratch after the restart
    ledger.record_trial(3, 70, 1, session=1, final=True)
    assert ledger.trial_spend() == {3: 170} and ledger.next_session() == 2


def test_ledger_sessions_for_wall_budgets(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record_session(0, 5)
    ledger.record_session(0, 60)
    ledger.record_trial(0, 50, 4)  # trials do not count towards wall spend
    assert ledger.next_session() == 1
    ledger.record_session(1, 30)  # downtime between the sessions is not counted
    ledger.record_session(1, 25)
    assert ledger.spent("wall") == 90 and ledger.next_session() == 2
    assert Ledger(ledger.path).spent("wall") == 90


def test_the_ledgers_running_spend_is_the_sum_of_the_maxima_after_every_record(tmp_path):
    """``timeline`` reads the spend after each record from running sums (not a sum over every trial each
    time): after every record of a random ledger (heartbeats out of order, reruns in later sessions, wall
    sessions) they equal the spend rule written out: the sum over (trial, session) of its largest spend."""
    import random

    rng = random.Random(0)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    expected_trials: dict[tuple[int, int], float] = {}
    expected_wall: dict[int, float] = {}
    steps = []
    for _ in range(400):
        session, number, seconds = rng.randrange(3), rng.randrange(12), round(rng.uniform(0, 90), 3)
        if rng.random() < 0.8:
            devices = rng.choice([0.5, 1, 2])
            ledger.record_trial(number, seconds, devices, session=session)
            key = (number, session)
            expected_trials[key] = max(expected_trials.get(key, 0.0), seconds * devices)
        else:
            ledger.record_session(session, seconds)
            expected_wall[session] = max(expected_wall.get(session, 0.0), seconds)
        steps.append((sum(expected_trials.values()), sum(expected_wall.values())))
    device_line, wall_line = ledger.timeline("gpu"), ledger.timeline("wall")
    assert [s for _, s in device_line] == pytest.approx([d for d, _ in steps], rel=1e-12, abs=1e-9)
    assert [s for _, s in wall_line] == pytest.approx([w for _, w in steps], rel=1e-12, abs=1e-9)
    assert ledger.spent("cpu") == pytest.approx(steps[-1][0], rel=1e-12)
    assert Ledger(ledger.path).spent("wall") == pytest.approx(steps[-1][1], rel=1e-12)


def test_ledger_torn_last_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.record_trial(0, 10, 1)
    full = json.dumps({"kind": "trial", "number": 1, "session": 0, "seconds": 99, "devices": 1, "final": False})
    with open(path, "a") as fh:  # a kill -9 mid-write
        fh.write(full[: len(full) // 2])
    reader = Ledger(path)
    assert reader.trial_spend() == {0: 10} and ledger.trial_spend() == {0: 10}
    Ledger(path).record_trial(2, 7, 1)
    for view in (ledger, reader, Ledger(path)):
        assert view.trial_spend() == {0: 10, 2: 7}
        assert [r["number"] for r in view.records()] == [0, 2]
    fresh = Ledger(path)
    assert fresh.records() and fresh.skipped == 1
    assert path.read_text().count("\n") == 3


def test_a_bad_line_inside_the_ledger_costs_only_itself(tmp_path):
    """New lines are parsed in one go; a line that is not a record (not JSON, a list, two values on one line)
    sends the read back to one line at a time, so only that line is skipped."""
    path = tmp_path / "ledger.jsonl"
    good = [json.dumps({"kind": "trial", "number": n, "session": 0, "seconds": 10 + n, "devices": 1, "final": False})
            for n in range(4)]
    path.write_text("\n".join([good[0], "not json", good[1], "[1]", good[2], "1, 2", good[3]]) + "\n")
    ledger = Ledger(path)
    assert [r["number"] for r in ledger.records()] == [0, 1, 2, 3] and ledger.skipped == 3
    assert ledger.trial_spend() == {0: 10, 1: 11, 2: 12, 3: 13}
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    clean_read = Ledger(clean)
    assert clean_read.records() == ledger.records() and clean_read.skipped == 0
    two = tmp_path / "two.jsonl"  # valid JSON once joined: only the count of values gives it away
    two.write_text("\n".join([good[0], "1, 2", good[1]]) + "\n")
    read = Ledger(two)
    assert [r["number"] for r in read.records()] == [0, 1] and read.skipped == 1


def test_ledger_reads_only_what_was_appended(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    writer, reader = Ledger(path), Ledger(path)
    with open(path, "w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"kind": "trial", "number": i % 50, "session": 0, "seconds": i // 50,
                                 "devices": 1, "final": False}) + "\n")
    assert reader.spent("gpu") == 50 * (100_000 // 50 - 1)
    parsed = []
    original = json.loads
    monkeypatch.setattr(json, "loads", lambda s: parsed.append(s) or original(s))
    writer.record_trial(7, 5000, 1)
    assert reader.trial_spend()[7] == 5000 and reader.spent("gpu") == 50 * 1999 + 5000 - 1999
    assert len(parsed) == 1


# -- BudgetKeeper ----------------------------------------------------------------------------------------
def test_keeper_reservations():
    keeper = BudgetKeeper(Budget.parse("100cpu-min"), ledger_spent=1000, room=1.2)  # 6000 s, 5000 left
    assert keeper.admit(0, 2000, 100, running=0) == 2400
    assert keeper.admit(1, 2000, 100, running=1) == 2400
    assert keeper.reserved() == 4800 and keeper.free() == pytest.approx(200)
    assert keeper.admit(2, 2000, 300, running=2) is None  # not even its first checkpoint fits
    assert keeper.admit(2, 2000, 100, running=2) is None  # waits: the running trials may give enough back
    keeper.update(0, 2300)
    keeper.update(1, 2350)  # now at most 150 can come back: waiting cannot make 2400 fit
    assert keeper.admit(2, 2000, 100, running=2) == pytest.approx(200)
    assert keeper.spent() + keeper.reserved() <= keeper.budget.seconds
    keeper.finish(0, 2300)
    keeper.finish(1, 2400)
    keeper.finish(2, 200)
    assert keeper.spent() == pytest.approx(5900) and keeper.reserved() == 0 and not keeper.exhausted()
    assert keeper.admit(3, 50, 10, running=0) == pytest.approx(60)
    keeper.finish(3, 90)
    assert keeper.exhausted() and keeper.remaining() < 30 and keeper.overshoot() == 0
    keeper.finish(4, 100)
    assert keeper.overshoot() == pytest.approx(90) and keeper.remaining() == 0 and keeper.free() == 0


def test_a_whole_run_is_admitted_only_where_it_can_finish():
    # a confirmation run cut by the budget counts for nothing: no cut-short admission for it
    keeper = BudgetKeeper(Budget.parse("100cpu-min"), ledger_spent=5000, room=1.2)  # 1000 s left
    assert keeper.admit(0, 2000, 100, running=0, whole=True) is None  # only its first checkpoint would fit
    assert keeper.admit(0, 2000, 100, running=0) == pytest.approx(1000)  # a search trial: cut short, partial results
    keeper.finish(0, 100)
    assert keeper.admit(1, 700, 100, running=0, whole=True) == pytest.approx(840)  # 700 x margin 1.2 fits in 900
    wall = BudgetKeeper(Budget.parse("10min"), ledger_spent=0, clock=lambda: 0.0)  # a deadline 600 s away
    assert wall.admit(0, 900, 60, running=0, whole=True) is None and wall.admit(0, 900, 60, running=0) == 600
    assert wall.admit(1, 500, 60, running=1, whole=True) == 600


def test_keeper_gives_slow_trials_room_while_the_budget_has_it():
    keeper = BudgetKeeper(Budget.parse("100cpu-min"), ledger_spent=0, margin=1.2, room=2.5)  # 6000 s
    assert keeper.admit(0, 1000, 100, running=0) == 2500
    assert keeper.admit(1, 1000, 100, running=1) == 2500
    assert keeper.admit(2, 1000, 100, running=2) is None  # 1000 free < 1200: wait for reservations to come back
    keeper.finish(0, 900)  # 1600 of its room unused
    assert keeper.admit(2, 1000, 100, running=1) == 2500
    assert keeper.spent() + keeper.reserved() <= keeper.budget.seconds
    with pytest.raises(ValueError):
        BudgetKeeper(Budget.parse("1cpu-h"), 0, margin=1.2, room=1.1)


def test_keeper_partial_trial_when_nothing_runs():
    keeper = BudgetKeeper(Budget.parse("10cpu-min"), ledger_spent=0)
    assert keeper.admit(0, 1000, 50, running=0) == 600  # cut short by the budget
    assert keeper.admit(1, 1, 0, running=1) is None
    with pytest.raises(ValueError):
        keeper.admit(0, 10, 1, running=1)


@pytest.mark.parametrize("seed, concurrency", [(0, 2), (1, 3), (2, 3)])
def test_keeper_never_overspends_and_spends_the_budget(seed, concurrency):
    rng = random.Random(seed)
    budget = Budget.parse("10gpu-h")  # 36000 device-seconds; trials cost ~1% of it
    keeper = BudgetKeeper(budget, ledger_spent=0)
    running: dict[int, float] = {}  # trial -> actual spend it will reach (cut at its cap)
    number, candidate = 0, None
    while True:
        while len(running) < concurrency:
            if candidate is None:
                predicted = rng.uniform(100, 600)
                candidate = (predicted, predicted * rng.uniform(0.1, 0.3), predicted * rng.uniform(0.6, 1.5))
            predicted, first, actual = candidate
            cap = keeper.admit(number, predicted, first, running=len(running))
            assert keeper.spent() + keeper.reserved() <= budget.seconds * (1 + 1e-12)
            if cap is None:
                break
            running[number] = min(actual, cap)
            number, candidate = number + 1, None
        if not running:
            break
        done = rng.choice(sorted(running))
        keeper.update(done, running[done] / 2)
        done = rng.choice(sorted(running))
        keeper.finish(done, running.pop(done))
        assert keeper.spent() <= budget.seconds * (1 + 1e-12)
    assert keeper.overshoot() == 0 and number > 50
    assert keeper.spent() >= 0.99 * budget.seconds


def test_keeper_wall_deadlines():
    now = [100.0]
    keeper = BudgetKeeper(Budget.parse("30min"), ledger_spent=600, clock=lambda: now[0])  # 1200 s left
    assert keeper.admit(0, 500, 50, running=0) == 1200
    now[0] += 200
    assert keeper.admit(1, 5000, 50, running=1) == 1000  # does not fit, reaches its first checkpoint
    assert keeper.reserved() == 0 and keeper.spent() == 800 and keeper.remaining() == 1000
    keeper.finish(0, 999)  # trial spend does not count: the clock does
    assert keeper.spent() == 800
    now[0] += 950
    assert keeper.admit(2, 500, 60, running=1) is None
    assert keeper.admit(3, 500, 40, running=1) == 50
    assert not keeper.exhausted()
    now[0] += 45
    assert keeper.exhausted() and keeper.overshoot() == 0
    now[0] += 10
    assert keeper.overshoot() == 5 and keeper.admit(4, 1, 0, running=0) is None


# -- CostModel -------------------------------------------------------------------------------------------
TRUE_FACTORS = {"lora": 1.0, "mola": 1.1, "dora": 2.0, "graphlora": 1.5}


def _true_cost(features, step_seconds=0.5, overhead=30.0):
    train = features["steps"] * step_seconds * features["tokens_per_step"] / 1024 * TRUE_FACTORS[features["method"]]
    return overhead + train, train


def _features(rng, method):
    return {"method": method, "steps": rng.choice([50, 100, 200, 400]),
            "tokens_per_step": rng.choice([512, 1024, 2048]), "eval_examples": 200}


def test_cost_model_priors():
    assert prior_for("minilm-l6", 16 * 64) == PRIORS["minilm-l6"]
    step, overhead = prior_for("smollm2-135m", 4 * 256)
    assert step == pytest.approx(1.7) and overhead == PRIORS["smollm2-135m"][1]
    assert prior_for("Some/Unknown-7B", 2048)[0] > PRIORS["smollm2-135m"][0]
    model = CostModel.for_model("minilm-l6", 1024)
    features = {"method": "dora", "steps": 100, "tokens_per_step": 2048, "eval_examples": 100}
    assert model.n_observed == 0 and model.predict(features) == pytest.approx(PRIORS["minilm-l6"][1] + 100 * 0.31 * 2 * 1.7)
    assert model.predict_to_step(features, 25) == pytest.approx(PRIORS["minilm-l6"][1] + 25 * 0.31 * 2 * 1.7)
    with pytest.raises(ValueError, match="lack eval_examples"):
        model.predict({"method": "lora", "steps": 1, "tokens_per_step": 1})


def _config_folder(path, hidden=64, intermediate=128, layers=4):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)  # config.json only
    return str(path)


def test_an_unmeasured_model_is_predicted_from_its_config(tmp_path):
    """Issue 13: a local model is scaled from the measured registry priors by its size, not a fixed guess."""
    tokens, steps = 4 * 64, 100
    tiny_step, tiny_overhead = prior_for("tiny-llama", tokens)
    step, overhead = prior_for(_config_folder(tmp_path / "same"), tokens)  # tiny-llama's sizes, saved locally
    assert step == pytest.approx(tiny_step, rel=0.05) and overhead == pytest.approx(tiny_overhead, rel=0.05)
    features = {"method": "lora", "steps": steps, "tokens_per_step": tokens, "eval_examples": 100}
    local = CostModel.for_model(str(tmp_path / "same"), tokens).predict(features)
    assert local == pytest.approx(CostModel.for_model("tiny-llama", tokens).predict(features), rel=0.05)
    assert local < 60  # not the 12.3 CPU-min of the old fixed guess
    small = prior_for(_config_folder(tmp_path / "small", hidden=256, intermediate=512), tokens)
    big = prior_for(_config_folder(tmp_path / "big", hidden=512, intermediate=1024), tokens)
    deep = prior_for(_config_folder(tmp_path / "deep", hidden=256, intermediate=512, layers=8), tokens)
    assert big[0] > small[0] and big[1] > small[1] and deep[0] > small[0] and deep[1] > small[1]
    assert prior_for(str(tmp_path / "small"), 2 * tokens)[0] > small[0]  # more tokens per step: slower steps
    from allocsearch.allocation.model_info import REGISTRY_CONFIGS

    for name in ("minilm-l6", "smollm2-135m"):  # the scaling reproduces the measured models it is anchored on
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(REGISTRY_CONFIGS[name]))
        assert prior_for(str(tmp_path / name), 1024)[0] == pytest.approx(prior_for(name, 1024)[0], rel=0.1)


def test_cost_model_learns_a_linear_cost():
    rng = random.Random(0)
    model = CostModel(2.0, 100.0, ref_tokens=1024)  # priors far off
    for i in range(40):
        features = _features(rng, ["lora", "mola", "dora", "graphlora"][i % 4])
        wall, train = _true_cost(features)
        noise = rng.uniform(0.98, 1.02)
        model.observe(features, wall * noise, features["steps"], train * noise)
    assert model.n_observed == 40
    for method in TRUE_FACTORS:
        for _ in range(5):
            features = _features(rng, method)
            assert model.predict(features) == pytest.approx(_true_cost(features)[0], rel=0.05)
    features = {"method": "dora", "steps": 200, "tokens_per_step": 1024, "eval_examples": 100}
    assert model.predict_to_step(features, 50) == pytest.approx(30 + 50 * 0.5 * 2.0, rel=0.05)
    unseen = {"method": "omoe", "steps": 100, "tokens_per_step": 1024, "eval_examples": 100}
    assert model.predict(unseen) == pytest.approx(30 + 100 * 0.5 * 1.2, rel=0.1)  # table factor for omoe

    restored = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert restored.n_observed == 40 and restored.predict(features) == model.predict(features)


def test_cost_model_stopped_trials_count_their_steps_done():
    model = CostModel(1.0, 10.0, ref_tokens=1024)
    features = {"method": "lora", "steps": 400, "tokens_per_step": 1024, "eval_examples": 100}
    model.observe(features, wall_seconds=20 + 25, steps_done=50, train_seconds=25)  # stopped at step 50
    assert model.predict(features) == pytest.approx(20 + 400 * 0.5)


def test_cost_model_learns_no_overhead_from_trials_stopped_before_their_final_evaluation():
    model = CostModel(1.0, 10.0, ref_tokens=1024)
    features = {"method": "lora", "steps": 400, "tokens_per_step": 1024, "eval_examples": 100}
    model.observe(features, wall_seconds=3 + 25, steps_done=50, train_seconds=25, complete=False)
    assert model.overhead_seconds == 10.0 and model.predict(features) == pytest.approx(10 + 400 * 0.5)
    model.observe(features, wall_seconds=30 + 100, steps_done=200, train_seconds=100)  # a completed one
    assert model.overhead_seconds == pytest.approx(30.0)
    restored = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert restored.predict(features) == model.predict(features) == pytest.approx(30 + 400 * 0.5)


def test_budget_module_is_pure_python():
    heavy = {"torch", "ray", "optuna", "numpy", "transformers"}
    import subprocess

    code = ("import sys; import allocsearch.search.budget, allocsearch.study.ledger; "
            f"print(sorted(m for m in {sorted(heavy)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ admission at its edges
def _keeper(minutes=2, unit="cpu", **kw):  # whole minutes: budgets are written in minutes, exact in seconds
    return BudgetKeeper(Budget.parse(f"{minutes}{unit}-min"), 0.0, **kw)


def test_admission_at_exactly_the_margin_and_exactly_the_first_checkpoint():
    assert _keeper(margin=1.25, room=2.5).admit(0, 96.0, 10.0, running=0) == 120.0  # 96 x 1.25 == 120 free
    assert _keeper(margin=1.25, room=2.5).admit(0, 48.0, 10.0, running=0) == 120.0  # min(free, 48 x 2.5)
    assert _keeper(margin=1.25, room=2.0).admit(0, 30.0, 10.0, running=0) == 60.0  # room, not margin
    k = _keeper()
    k.finish(9, 119.5)  # 0.5 free: a first checkpoint of exactly 0.5 fits, cut there
    assert k.free() == 0.5 and k.admit(0, 10.0, 0.5, running=0) == 0.5
    k = _keeper()
    k.finish(9, 119.5)
    assert k.admit(0, 10.0, 0.6, running=0) is None  # its first checkpoint does not fit
    assert k.admit(0, 10.0, 0.5, running=0, whole=True) is None  # a whole run never starts cut


def test_one_running_trial_whose_reservation_would_make_room_means_wait():
    k = _keeper(margin=1.2, room=2.5)
    assert k.admit(0, 36.0, 5.0, running=0) == 90.0  # reserves 90 of 120
    k.update(0, 10.0)  # it used 10 of its 90: 80 may come back
    # 30 free: 36 x 1.2 does not fit now but would with what trial 0 gives back: wait, with one running
    assert k.admit(1, 36.0, 5.0, running=1) is None
    assert k.admit(1, 36.0, 5.0, running=0) == 30.0  # nothing running to wait for: cut at its checkpoints
    k = _keeper(margin=1.2, room=1.2)
    assert k.admit(0, 60.0, 5.0, running=0) == 72.0
    k.update(0, 72.0)  # used all of its cap: nothing comes back; 48 free < 60 x 1.2: admitted, cut
    assert k.admit(1, 60.0, 5.0, running=1) == 48.0


def test_admission_refuses_bad_numbers_and_an_admitted_trial_twice():
    k = _keeper()
    with pytest.raises(ValueError, match="predicted must be > 0"):
        k.admit(0, 0.0, 1.0, running=0)
    with pytest.raises(ValueError, match="predicted must be > 0"):
        k.admit(0, 1.0, -1.0, running=0)
    assert k.admit(0, 1.0, 0.0, running=0) == 2.5  # a first checkpoint at 0 is allowed
    with pytest.raises(ValueError, match="trial 0 is already admitted"):
        k.admit(0, 1.0, 1.0, running=1)
    assert k.in_flight() == 0.0 and k.reserved() == 2.5
    k.update(0, 1.5)
    assert k.in_flight() == 1.5


def test_wall_budgets_admit_until_the_deadline_and_hold_no_reservations():
    clock = [0.0]
    k = BudgetKeeper(Budget.parse("2min"), 0.0, clock=lambda: clock[0])
    assert k.admit(0, 30.0, 5.0, running=0) == 120.0 and k.reserved() == 0.0
    k.update(0, 20.0)
    assert k.in_flight() == 0.0  # wall budgets count the clock, not the trials
    clock[0] = 119.0
    assert k.admit(1, 30.0, 1.0, running=1) == 1.0  # its first checkpoint fits exactly
    assert k.admit(2, 30.0, 1.0, running=2, whole=True) is None  # a whole run of 30 does not
    clock[0] = 120.0
    assert k.admit(3, 1.0, 0.0, running=2) is None and k.free() == 0.0


def test_exhausted_below_half_a_percent():
    k = _keeper(minutes=20)  # 1200 s: 0.5% is 6 s
    k.finish(0, 1194.0)  # exactly 6 left: not yet
    assert k.remaining() == 6.0 and not k.exhausted()
    k.finish(1, 0.01)
    assert k.exhausted()
    with pytest.raises(ValueError, match="margin must be >= 1"):
        _keeper(margin=0.9)
    with pytest.raises(ValueError, match="room >= margin"):
        _keeper(margin=1.5, room=1.4)
