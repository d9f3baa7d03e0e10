"""Known-answer tables in the replay: where a configuration puts its rank units, the table's card carrying
the answer of a known-answer model folder, and ``bench search`` scoring how often an export puts the most
rank in the right group (synthetic tables whose truth is known)."""
from __future__ import annotations

import json
import random

import pytest

from allocsearch.bench import compare
from allocsearch.bench.placement import group_capacity, holds_any, holds_most
from allocsearch.bench.record import known_answer_of
from allocsearch.bench.table import Table, write
from allocsearch.study.confidence import config_key

MIDDLE = {"group": "middle", "index": 1, "groups": 3, "layers": [2, 3]}


def test_capacity_per_group_is_experts_times_rank():
    assert group_capacity({"lora.rank_g0": 8, "lora.rank_g1": 0, "lora.rank_g2": 4}, 3) == [8, 0, 4]
    assert group_capacity({"lora.rank": 8}, 3) == [8, 8, 8]
    assert group_capacity({"mola.experts_g0": 2, "mola.experts_g1": 6, "mola.experts_g2": 0, "mola.rank": 4,
                           "lr": 1e-3, "method": "mola"}, 3) == [8, 24, 0]
    with pytest.raises(ValueError, match="one method"):
        group_capacity({"lr": 1e-3}, 3)


@pytest.mark.parametrize("ranks, most, any_", [
    ((0, 8, 0), True, True), ((0, 8, 4), True, True),
    ((8, 8, 0), False, True),  # a tie with another group is not "the most"
    ((8, 8, 8), False, True), ((8, 0, 8), False, False),
])
def test_the_answer_group_holds_the_most_only_strictly(ranks, most, any_):
    params = {f"lora.rank_g{g}": r for g, r in enumerate(ranks)}
    assert holds_most(params, MIDDLE) is most and holds_any(params, MIDDLE) is any_


def test_a_known_answer_model_folder_gives_its_answer_and_any_other_none(tmp_path):
    ka = tmp_path / "ka"
    (ka / "model").mkdir(parents=True)
    (ka / "card.json").write_text(json.dumps({"answer": {"group": "middle", "layers": [2, 3]},
                                              "construction": {"groups": 3, "scale": 0.5}}))
    answer = known_answer_of(str(ka / "model"))
    assert answer == {"group": "middle", "layers": [2, 3], "index": 1, "groups": 3,
                      "construction": {"groups": 3, "scale": 0.5}}
    (ka / "card.json").write_text(json.dumps({"name": "a table card"}))
    assert known_answer_of(str(ka / "model")) is None
    assert known_answer_of(str(tmp_path / "elsewhere")) is None and known_answer_of("minilm-l6") is None


SPACE = {
    "version": 1, "model": "tiny-llama", "priors": False,
    "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
    "train": {"steps": 8, "batch_size": 4, "max_length": 64, "eval_every": 2, "eval_examples": 8, "lr": 1e-3},
    "methods": {"lora": {"rank": {"groups": 3, "each": {"choice": [0, 8]}}}},
}


def ka_table(folder, weights, noise=0.005):
    """The 7 placements of SPACE on 3 seeds; true quality 0.6 + the weights of the groups that hold rank."""
    rng = random.Random(0)
    rows = []
    for code in range(1, 8):
        ranks = [8 * ((code >> g) & 1) for g in range(3)]
        p = {"lora.rank_g0": ranks[0], "lora.rank_g1": ranks[1], "lora.rank_g2": ranks[2]}
        truth = 0.6 + sum(w for w, r in zip(weights, ranks) if r)
        cost = 4.0 + 2.0 * sum(1 for r in ranks if r)
        for s in (0, 1, 2):
            final = truth + rng.gauss(0, noise)
            for step in (2, 4, 6):
                rows.append({"config": config_key(p), "seed": s, "step": step, "final": 0, "validation": final,
                             "device_seconds": cost * step / 8})
            rows.append({"config": config_key(p), "seed": s, "step": 8, "final": 1, "validation": final,
                         "test": final, "device_seconds": cost, "train_seconds": cost, "trainable_params": 10})
    card = {"name": "ka", "cpus_per_trial": 1.0, "budget_unit": "cpu", "known_answer": MIDDLE}
    write(folder, rows, card, json.dumps(SPACE))
    return Table.load(folder)


@pytest.mark.parametrize("weights, placed", [
    ((-0.03, 0.2, -0.03), 1.0),  # capacity elsewhere hurts: the single-middle placement is the best
    ((0.1, 0.2, -0.03), 0.0),  # the bottom group helps too: the best holds both, not "the most" in the middle
])
def test_the_replay_scores_how_often_the_export_puts_the_most_rank_in_the_answer(tmp_path, weights, placed):
    table = ka_table(tmp_path / "t", weights)
    result = compare.run(table, ["grid"], [1.0], 2)  # the whole grid: the export is the true best
    row = result["rows"][0]
    assert row["hit"] == 1.0 and row["placed"] == placed and row["holds"] == 1.0
    assert result["known_answer"] == MIDDLE


def test_the_goals_name_the_known_answer_and_the_priors_only_comparison(tmp_path):
    table = ka_table(tmp_path / "t", (-0.03, 0.2, -0.03))
    result = compare.run(table, ["default", "random"], [0.25, 1.0], 3)
    goals = {g: (met, text) for g, met, text in compare.goals(result)}
    known = next(g for g in goals if g.startswith("known answer (middle group)"))
    default_25 = next(r for r in result["rows"] if r["strategy"] == "default" and r["budget"] == 0.25)
    assert goals[known] == (default_25["placed"] >= 0.9,
                            f"{default_25['placed']:.0%} (an adapter there at all: {default_25['holds']:.0%})")
    assert "at 25% of the grid" in known
    assert not any("priors-only" in g for g in goals)  # not replayed: no comparison printed


def test_a_table_with_its_model_config_replays_without_the_model_folder(tmp_path):
    """A known-answer table ships its model's config.json (the cost model and the depth read it); its space's
    relative model resolves against the table's folder, wherever the table is."""
    import yaml

    folder = tmp_path / "ka"
    table = ka_table(folder, (-0.03, 0.2, -0.03))
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 6,
                                                               "hidden_size": 384, "intermediate_size": 1536,
                                                               "num_attention_heads": 12, "vocab_size": 30522}))
    (folder / "space.yaml").write_text(yaml.safe_dump({**SPACE, "model": "model"}))
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    loaded = Table.load(moved)
    assert loaded.space["model"] == str((moved / "model").resolve()) and loaded.num_layers == 6
    assert table.num_layers == 4  # tiny-llama's, from the registry (no card entry, no folder)
    result = compare.run(loaded, ["default"], [0.5], 2)
    assert result["rows"][0]["trials"] >= 1
