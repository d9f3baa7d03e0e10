"""``allocsearch bench known-answer``: a task whose best allocation is known by construction.

The construction (a teacher-student task carried by a local model folder):

1. The teacher is the base model (MiniLM-L6 by default). Real sentences (the bundled SST-2 sentences, or
   a folder of the full data sets) are labelled by the teacher: ``label = [w . pool_T(x) > median]``, where
   ``pool_T`` is the teacher's pooled output (what a BERT classifier reads) and ``w`` is the direction the
   damage below moves most (the top right singular vector of ``pool_T - pool_S`` over the sentences). The
   median threshold balances the labels exactly; the ``margin`` share of sentences nearest it is left out
   (a label a hair from the threshold is noise to every student alike).
2. The student's starting model is the teacher with the Linears of one layer group damaged by a seeded
   rank-``r`` perturbation, ``W <- W + scale * ||W||_2 * U V^T / ||U V^T||_2`` (U, V Gaussian). It is saved
   as a model folder: ``--model <out>/model`` is the users' own-model path.
3. An adapter of rank >= r on those Linears can write ``-scale * ||W||_2 * U V^T / ||U V^T||_2`` exactly,
   so a student with capacity in the damaged group can become the teacher again, and the teacher's labels
   are linear in its pooled output (a classifier head fits them exactly); a student with its capacity
   elsewhere can only approximate. The card records how well a head alone (logistic regression on the
   damaged model's frozen pooled output) fits the labels: the floor any allocation starts from.

Writes ``<out>/model/`` (the damaged model, tokenizer included), ``<out>/data.jsonl`` (text, label),
``<out>/test.jsonl``, ``<out>/space.yaml`` (a placement space over the model's layer groups, learning rate
fixed) and ``<out>/card.json`` (the construction, its seed and the head-alone accuracy). Whether the right
placement wins, and by how much, is measured by training students: ``allocsearch bench signal --space
<out>/space.yaml --every-seed``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from allocsearch.errors import AllocsearchError

GROUPS = ("bottom", "middle", "top")
ALONG = ("random", "inputs")
LABELS = ("a", "b")


class KnownAnswerError(AllocsearchError):
    """Bad input to the builder; one line with the fix."""


@dataclass
class Construction:
    """What the builder does; stored in the card so the task can be rebuilt exactly."""
    model: str = "minilm-l6"
    group: str = "top"  # the damaged layer group (the answer): bottom, middle or top third
    groups: int = 3  # layer groups of the placement space
    targets: list[str] = field(default_factory=lambda: ["query", "value"])  # damaged Linears (short names)
    rank: int = 4  # rank of the damage
    scale: float = 1.0  # its spectral norm as a fraction of each weight's
    seed: int = 0
    sentences: int = 3000  # read from the train file (a third of those kept becomes the validation split)
    margin: float = 0.0  # the share of sentences nearest the threshold left out (0.2: no label a hair from it)
    test_sentences: int = 872  # from the test file (SST-2's dev)
    steps: int = 150
    lr: float = 3.0e-3
    space_rank: int = 8  # what a group holds in the placement space (0 or this)
    split: str = ""  # "TOTAL/STEP": the space splits a fixed rank total over the groups instead (one budget)
    along: str = "random"  # the damage's input directions: random, or the Linear's top principal inputs


def check(c: Construction) -> None:
    if c.group not in GROUPS:
        raise KnownAnswerError(f"--group {c.group!r}; fix: use one of {', '.join(GROUPS)}")
    if c.rank < 1 or c.space_rank < c.rank:
        raise KnownAnswerError(f"--rank {c.rank} with a space rank of {c.space_rank}: an adapter undoes the damage "
                               f"only with rank >= the damage's; fix: a rank in 1..{c.space_rank}")
    if c.split:
        total, step = split_of(c.split)
        if total < c.rank:
            raise KnownAnswerError(f"--split {c.split}: a total below the damage's rank {c.rank} cannot undo it; "
                                   f"fix: a total of at least {c.rank}")
    if c.along not in ALONG:
        raise KnownAnswerError(f"--along {c.along!r}; fix: use one of {', '.join(ALONG)}")
    if not 0 <= c.margin <= 0.8:
        raise KnownAnswerError(f"--margin {c.margin}; fix: a share in [0, 0.8], e.g. 0.2")
    if not 0 < c.scale <= 10:
        raise KnownAnswerError(f"--scale {c.scale}; fix: a value in (0, 10], e.g. 1.0")
    if c.sentences < 200 or c.test_sentences < 50:
        raise KnownAnswerError(f"--sentences {c.sentences} / --test-sentences {c.test_sentences}; fix: at least "
                               f"200 and 50 (validation takes a third of the first)")


def read_sentences(data_dir: str | None) -> tuple[list[str], list[str]]:
    """(train sentences, test sentences): SST-2's train and dev files (bundled or in ``data_dir``)."""
    from allocsearch.data.formats import iter_tsv
    from allocsearch.data.tasks import default_data_dir

    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    folder = root / "glue_SST-2"
    if not (folder / "train.tsv").is_file():
        raise KnownAnswerError(f"{folder} has no train.tsv; fix: --data-dir a folder with glue_SST-2/ in it, or "
                               f"leave it out for the bundled sentences")
    read = lambda name: [row["sentence"].strip() for _, _, row in  # noqa: E731
                         iter_tsv(folder / name, ("sentence", "label"), header=True)]
    return read("train.tsv"), read("dev.tsv")


def build(c: Construction, out: str | Path, data_dir: str | None = None) -> dict:
    """Build the task into ``out`` (see the module); returns the card."""
    import torch

    from allocsearch.allocation.config import AllocationConfig
    from allocsearch.allocation.shapes import group_layers
    from allocsearch.fileio import write_text_atomic
    from allocsearch.moe.adapter import resolve_targets
    from allocsearch.training.models import load_model

    check(c)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KnownAnswerError(f"{out} exists and is not an empty folder; fix: give a new folder (nothing is "
                               f"overwritten)")
    if not out.parent.is_dir():
        raise KnownAnswerError(f"{out.parent} does not exist; fix: create it or give another --out")
    train_text, test_text = read_sentences(data_dir)
    train_text, test_text = train_text[: c.sentences], test_text[: c.test_sentences]
    loaded = load_model(c.model, device="cpu", dtype="fp32", seed=c.seed)
    if loaded.family != "bert":
        raise KnownAnswerError(f"{c.model} is a {loaded.family} model; fix: a BERT-style encoder such as minilm-l6 "
                               f"(the labels are read from its pooled output)")
    model, tok = loaded.model.eval(), loaded.tokenizer
    teacher = _pooled(model, tok, train_text + test_text)
    layers = group_layers(loaded.num_layers, c.groups, GROUPS.index(c.group))
    probe = AllocationConfig.uniform("lora", loaded.num_layers, rank=1, targets=list(c.targets))
    gen = torch.Generator().manual_seed(c.seed)
    paths = [path for j, target, path in resolve_targets(model, probe) if j in layers]
    inputs = _principal_inputs(model, tok, train_text[:256], paths, c.rank) if c.along == "inputs" else {}
    damaged = []
    with torch.no_grad():
        for path in paths:
            w = model.get_submodule(path).weight
            u, v = torch.randn(w.shape[0], c.rank, generator=gen), torch.randn(w.shape[1], c.rank, generator=gen)
            v = inputs.get(path, v)  # "inputs": V spans the directions its inputs vary most along
            delta = u @ v.T
            delta *= c.scale * torch.linalg.matrix_norm(w, ord=2) / torch.linalg.matrix_norm(delta, ord=2)
            w.add_(delta)
            damaged.append(path)
    student = _pooled(model, tok, train_text + test_text)
    # the direction the damage moves most: what the labels read, so a head alone cannot recover it
    moved = teacher - student
    direction = torch.linalg.svd(moved - moved.mean(0), full_matrices=False).Vh[0]
    score = teacher @ direction
    n_train = len(train_text)
    threshold = score[:n_train].median()
    labels = (score > threshold).long()
    # leave out the margin share of each label's train sentences nearest the threshold (the labels stay
    # balanced), and the test sentences inside the same cuts
    distance = (score - threshold).abs()
    cuts = [torch.quantile(distance[:n_train][labels[:n_train] == y], c.margin) if c.margin else -1.0
            for y in (0, 1)]
    keep = [i for i in range(len(score)) if distance[i] > cuts[int(labels[i])]]
    keep_train = _balanced([i for i in keep if i < n_train], labels)
    keep_test = [i for i in keep if i >= n_train]
    train_text = [train_text[i] for i in keep_train]
    test_text = [test_text[i - n_train] for i in keep_test]
    rows = torch.tensor(keep_train + keep_test)
    teacher, student, labels = teacher[rows], student[rows], labels[rows]
    n_train = len(train_text)
    head_alone = _head_accuracy(student[:n_train], labels[:n_train], c.seed)
    head_teacher = _head_accuracy(teacher[:n_train], labels[:n_train], c.seed)
    final, out = out, out.parent / f".{out.name}.partial"  # written aside, renamed when whole
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    write = lambda name, texts, ys: write_text_atomic(out / name, "".join(  # noqa: E731
        json.dumps({"text": t, "label": LABELS[int(y)]}) + "\n" for t, y in zip(texts, ys)))
    write("data.jsonl", train_text, labels[:n_train])
    write("test.jsonl", test_text, labels[n_train:])
    card = {"construction": asdict(c), "answer": {"group": c.group, "layers": layers}, "damaged": damaged,
            "sentences": {"train": n_train, "test": len(test_text)},
            "labels": {"train_positive_share": float(labels[:n_train].float().mean()),
                       "test_positive_share": float(labels[n_train:].float().mean())},
            "head_alone_accuracy": head_alone, "head_on_teacher_accuracy": head_teacher,
            "pooled_change": float(moved.norm(dim=1).mean() / teacher.norm(dim=1).mean())}
    write_text_atomic(out / "space.yaml", _space(c, final.resolve(), n_train, len(test_text)))
    write_text_atomic(out / "card.json", json.dumps(card, indent=2))
    if final.exists():
        final.rmdir()  # empty (checked above)
    out.rename(final)
    return card


def _balanced(rows: list[int], labels) -> list[int]:
    """``rows`` with as many of each label (the first ones of the larger class dropped from the end)."""
    by = [[i for i in rows if int(labels[i]) == y] for y in (0, 1)]
    n = min(len(by[0]), len(by[1]))
    kept = set(by[0][:n] + by[1][:n])
    return [i for i in rows if i in kept]


def _principal_inputs(model, tok, texts: list[str], paths: list[str], k: int) -> dict:
    """For each Linear at ``paths``: its inputs' top ``k`` right singular vectors (d_in x k) over the tokens
    of ``texts`` (padding left out), on the undamaged model."""
    import torch

    seen: dict[str, list] = {path: [] for path in paths}
    mask = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda mod, args, out, path=path: seen[path].append(args[0][mask["m"]])) for path in paths]
    try:
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
                mask["m"] = enc["attention_mask"].bool()
                model.bert(**enc)
    finally:
        for hook in hooks:
            hook.remove()
    return {path: torch.linalg.svd(torch.cat(xs), full_matrices=False).Vh[:k].T for path, xs in seen.items()}


def _pooled(model, tok, texts: list[str], batch: int = 64):
    """The pooled output (BERT's pooler: tanh(W h_CLS)) of every text, in eval mode."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            out.append(model.bert(**enc).pooler_output)
    return torch.cat(out)


def _head_accuracy(x, y, seed: int) -> float:
    """Held-out accuracy of a logistic-regression head on frozen features (2/3 fit, 1/3 scored)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    cut = 2 * len(y) // 3
    fit, held = order[:cut], order[cut:]
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    z = (x - mean) / std
    head = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(z[fit]).squeeze(1), y[fit].float())
        loss = loss + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((head(z[held]).squeeze(1) > 0).long() == y[held]).float().mean())


def split_of(text: str) -> tuple[int, int]:
    """``--split TOTAL/STEP`` as two whole numbers, TOTAL a multiple of STEP."""
    try:
        total, step = (int(v) for v in text.split("/"))
    except ValueError:
        raise KnownAnswerError(f"--split {text!r}; fix: write TOTAL/STEP, e.g. 6/2") from None
    if step < 1 or total < step or total % step:
        raise KnownAnswerError(f"--split {text}: the total must be a positive multiple of the step; fix: e.g. 6/2")
    return total, step


def placements(c: Construction) -> int:
    """How many placements the written space holds: every split of the total, or 2^groups - 1 (r or nothing
    per group, all nothing left out)."""
    if c.split:
        from allocsearch.search.space.dims import splits

        total, step = split_of(c.split)
        return len(splits(total, step, c.groups))
    return 2 ** c.groups - 1


def _space(c: Construction, out: Path, n_train: int, n_test: int) -> str:
    validation = n_train // 3
    if c.split:
        total, step = split_of(c.split)
        holds = f"a share of {total} rank units in\n# multiples of {step} (one budget, every placement of it; priors on: the papers' uniform rank is the\n# even split)"
        # alpha = 2 x the damage's rank: the smallest adapter that undoes it scales by 2, as r8 does at alpha 16
        rank = f"{{groups: {c.groups}, total: {total}, step: {step}}}\n    alpha: {2 * c.rank}"
        priors = "true"
    else:
        holds = f"LoRA r{c.space_rank} or nothing"
        priors = "false"  # LoRA r8 would be r8 in every group: the largest placement, the answer's group in it
        rank = f"{{groups: {c.groups}, each: {{choice: [0, {c.space_rank}]}}}}"
    return f"""# A known-answer placement space (allocsearch bench known-answer): the damage sits in the {c.group}
# layer group; each of {c.groups} groups holds {holds} on {', '.join(c.targets)}.
version: 1
model: {json.dumps(str(out / "model"))}
data:
  seed: 0
  tasks:
    - {{name: known-answer, path: {json.dumps(str(out / "data.jsonl"))}, test_path: {json.dumps(str(out / "test.jsonl"))},
       format: classification,
       labels: [{', '.join(LABELS)}], train: {n_train - validation}, validation: {validation}, test: {n_test}}}
objective: validation_macro_balanced_accuracy
priors: {priors}
train: {{steps: {c.steps}, batch_size: 16, max_length: 64, eval_every: {max(1, c.steps // 4)}, eval_examples: {validation},
        warmup_ratio: 0.06, lr: {c.lr}}}
methods:
  lora:
    rank: {rank}
    targets: [{', '.join(c.targets)}]
"""


__all__ = ["Construction", "ALONG", "GROUPS", "KnownAnswerError", "build", "check", "placements", "read_sentences"]
