"""The split form: a fixed total of rank (or experts) split over layer groups, ``{groups, total, step}`` -- every
placement of the same trainable budget, one categorical dimension ``<method>.rank_split = "0/2/4"``."""
from __future__ import annotations

import json

import optuna
import pytest

from allocsearch.allocation.config import resolve_allocation
from allocsearch.bench.placement import group_capacity, holds_most
from allocsearch.search.samplers import make_sampler
from allocsearch.search.space.dims import splits
from allocsearch.search.space.space import SearchSpace, SpaceError, load_space
from tests.test_space import BASE, check_trial, write

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPLIT = BASE + "methods:\n  lora: {rank: {groups: 3, total: 6, step: 2}}\n"


@pytest.mark.parametrize("total, step, groups, count", [(6, 2, 3, 10), (24, 8, 3, 10), (8, 4, 2, 3), (5, 1, 1, 1),
                                                         (12, 2, 4, 84)])
def test_splits_are_every_way_to_write_the_total(total, step, groups, count):
    got = splits(total, step, groups)
    assert len(got) == len(set(got)) == count  # stars and bars: C(total/step + groups - 1, groups - 1)
    assert all(sum(s) == total and len(s) == groups and all(v % step == 0 and v >= 0 for v in s) for s in got)
    assert got[0][0] == total and got[-1][-1] == total  # everything in the first group first


def test_a_split_space_places_one_budget_every_way(tmp_path):
    space = load_space(write(tmp_path, "s.yaml", SPLIT))
    assert space.grid_size(6) == 10
    assert [r["name"] for r in space.dimensions(6)] == ["lora.rank_split"]
    assert "6 split over layers 0-1 / 2-3 / 4-5" in space.dimensions(6)[0]["domain"]
    params = {"lora.rank_split": "2/0/4"}
    alloc = resolve_allocation(space.trial_spec(params, 6)["allocation"], 6)
    assert alloc.rank == [2, 2, 0, 0, 4, 4] and alloc.adapted_layers == [0, 1, 4, 5]
    assert space.summarize(params) == "lora r2/0/4" and not space.trains_nothing(params, 6)
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again.fingerprint() == space.fingerprint()
    # the grid sampler walks all 10 placements; every one builds and holds the same 6 rank units per layer pair
    study = optuna.create_study(sampler=make_sampler("grid", 0))  # ours: the used-up grid only noted
    drawn = set()
    for _ in range(10):
        trial = study.ask()
        p = space.sample(trial, 6)
        study.tell(trial, 0.0)
        check_trial(space, p, 6)
        drawn.add(p["lora.rank_split"])
        assert sum(resolve_allocation(space.trial_spec(p, 6)["allocation"], 6).rank) == 2 * 6
    assert len(drawn) == 10


def test_priors_take_the_even_split_and_the_shapes_that_fit(tmp_path):
    text = BASE + ("methods:\n  lora: {rank: {groups: 3, total: 6, step: 2}}\n"
                   "  mola: {experts: {groups: 4, total: 20, step: 1}, top_k: 2, rank: 4}\n")
    report = {label: (params, notes) for label, params, notes in load_space(write(tmp_path, "p.yaml", text))
              .prior_report(8)}
    assert report["LoRA r8"][0]["lora.rank_split"] == "2/2/2"  # a uniform rank: the budget split evenly
    assert report["MoLA 5555"][0]["mola.experts_split"] == "5/5/5/5"
    assert report["MoLA 2468"][0]["mola.experts_split"] == "2/4/6/8"  # MoLA's inverted triangle at 20 experts
    odd = load_space(write(tmp_path, "o.yaml", BASE + "methods:\n  lora: {rank: {groups: 3, total: 8, step: 2}}\n"))
    (label, params, notes), = odd.prior_report(6)
    assert params is None and "8 does not split evenly over 3 groups" in notes[0]


@pytest.mark.parametrize("node, match", [
    ("{groups: 3, total: 7, step: 2}", "total 7 is not a multiple of step 2"),
    ("{groups: 3, total: 6, step: 2, each: 4}", "unknown key 'each' in the split form"),
    ("{groups: 0, total: 6}", "groups is 0"),
    ("{groups: 8, total: 400}", "ways to split 400 over 8 groups"),
])
def test_a_bad_split_gets_one_line_with_the_fix(tmp_path, node, match):
    path = write(tmp_path, "b.yaml", BASE + f"methods:\n  lora: {{rank: {node}}}\n")
    with pytest.raises(SpaceError, match=match) as err:
        load_space(path)
    assert "\n" not in str(err.value) and "lora.rank" in str(err.value)


def test_more_groups_than_layers_is_refused(tmp_path):
    space = load_space(write(tmp_path, "d.yaml", BASE + "methods:\n  lora: {rank: {groups: 5, total: 5}}\n"))
    with pytest.raises(SpaceError, match="needs at least 5 layers"):
        space.grid_size(4)


def test_an_expert_split_caps_top_k_at_the_largest_group():
    space = SearchSpace.from_dict({"version": 1, "model": "tiny-llama", "priors": False,
                                   "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 8, "validation": 4,
                                                                  "test": 4}]},
                                   "train": {"steps": 4, "lr": 1e-3},
                                   "methods": {"mola": {"experts": {"groups": 2, "total": 4, "step": 2},
                                                        "top_k": {"int": [1, 4]}, "rank": 4}}})
    # splits 4/0 and 0/4 (top-k 1..4), 2/2 (top-k 1..2)
    assert space.grid_size(4) == 4 + 4 + 2
    alloc = resolve_allocation(space.trial_spec({"mola.experts_split": "0/4", "mola.top_k": 3}, 4)["allocation"], 4)
    assert alloc.experts == [0, 0, 4, 4] and alloc.top_k == [0, 0, 3, 3]


def test_the_known_answer_reads_a_split():
    assert group_capacity({"lora.rank_split": "2/0/4"}, 3) == [2.0, 0.0, 4.0]
    assert holds_most({"lora.rank_split": "0/2/4"}, {"groups": 3, "index": 2})
    assert not holds_most({"lora.rank_split": "2/2/2"}, {"groups": 3, "index": 2})  # a tie is not the most
    with pytest.raises(ValueError, match="has 2 groups"):
        group_capacity({"lora.rank_split": "2/4"}, 3)
