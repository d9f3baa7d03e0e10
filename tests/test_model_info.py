"""Issue 13: `start --model` takes what load_model takes -- registry names, local folders (stored absolute, so
trials find them from Ray's working folders) and HF ids already in the local HF cache -- with depth and family
read from config.json without loading weights; and a study.json written by `prepare` holds only absolute paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from allocsearch.allocation.config import model_family
from allocsearch.allocation.model_info import ModelInfoError, absolute, config_path, model_config
from allocsearch.search.space.space import SpaceError, load_space, model_depth
from conftest import one_line

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
SPACE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 16, validation: 8, test: 8}]}
train: {steps: 4, batch_size: 4, max_length: 64, eval_every: 2, lr: 1.0e-3}
methods: {lora: {rank: {choice: [2, 4]}}}
"""


def save_tiny(folder: Path, layers: int = 2, weights: bool = False) -> Path:
    """A random tiny Llama folder written by transformers: config.json only, or loadable (weights + tokenizer)."""
    from transformers import LlamaConfig

    if weights:
        from allocsearch.training.models import load_model

        lm = load_model("tiny-llama", device="cpu")
        lm.model.config.num_hidden_layers = layers
        lm.model.model.layers = lm.model.model.layers[:layers]
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
    else:
        LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    return folder


@pytest.fixture
def hf_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache under a temp HF_HOME. huggingface_hub reads the cache folder from the environment at
    import, so its constant (which it and transformers read at every lookup) follows the variable here."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def cache(hub: Path, repo_id: str, **kw) -> Path:
    """Put a tiny model into the HF cache layout (refs/main -> snapshots/<commit>/) as a download would."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    save_tiny(repo / "snapshots" / SNAPSHOT, **kw)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def test_local_folders_and_cached_ids_give_depth_and_family(tmp_path, monkeypatch, hf_hub):
    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "mymodel", layers=3)
    for name in ("mymodel", "./mymodel", str(tmp_path / "mymodel")):
        assert model_depth(name) == 3 and model_family(name) == "llama"
        assert absolute(name) == str(tmp_path / "mymodel")
    snapshot = cache(hf_hub, "some-org/tiny", layers=5)
    assert config_path("some-org/tiny") == snapshot / "config.json"
    assert model_depth("some-org/tiny") == 5 and model_family("some-org/tiny") == "llama"
    assert absolute("some-org/tiny") == "some-org/tiny" and absolute("tiny-llama") == "tiny-llama"
    assert model_depth("tiny-llama") == 4 and model_config("minilm-l6")["model_type"] == "bert"


def test_names_that_are_none_of_these_are_one_line_with_the_fix(tmp_path, hf_hub):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cases = [("org/not-cached", "hf download org/not-cached"), (str(tmp_path / "empty"), "has no config.json"),
             ("no/such/model", "not a known model"), (str(tmp_path / "missing"), "the path of a local model folder"),
             (str(tmp_path / "m.gguf"), "save_pretrained it to a folder")]
    for name, needle in cases:
        with pytest.raises(SpaceError) as info:
            model_depth(name)
        assert needle in one_line(info) and "fix:" in str(info.value)
        assert model_family(name) is None
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ModelInfoError, match="cannot be read"):
        model_config(str(tmp_path / "empty"))


def test_start_accepts_exactly_what_load_model_loads(tmp_path, monkeypatch, hf_hub):
    """One rule: each name is accepted by the space's depth check iff load_model loads it."""
    from allocsearch.training.models import ModelError, load_model

    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "mymodel", weights=True)
    cache(hf_hub, "some-org/tiny", weights=True)
    (tmp_path / "empty").mkdir()
    for name, ok in [("tiny-llama", True), ("./mymodel", True), ("some-org/tiny", True), ("org/absent", False),
                     ("./empty", False), ("./missing/model", False)]:
        try:
            model_depth(name)
            start_ok = True
        except SpaceError:
            start_ok = False
        try:
            lm = load_model(name, device="cpu")
            load_ok = True
            assert lm.num_layers == model_depth(name) and lm.family == model_family(name)
        except ModelError:
            load_ok = False
        assert start_ok == load_ok == ok, name


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_prepare_stores_only_absolute_paths_and_resumes_from_anywhere(tmp_path, monkeypatch):
    from allocsearch.search.session import StartOptions, prepare
    from allocsearch.study.folder import StudyError

    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "mymodel")
    (tmp_path / "datasets").mkdir()
    (tmp_path / "specs" / "data").mkdir(parents=True)
    records = [{"text": f"a {'fine' if i % 2 else 'poor'} film {i}", "label": "positive" if i % 2 else "negative"}
               for i in range(30)]
    (tmp_path / "specs" / "data" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "specs" / "data.yaml").write_text(
        "data_dir: ../datasets\ntasks:\n  - {name: mine, path: data/mine.jsonl, format: classification, "
        "labels: [negative, positive], test_ratio: 0.2, train: 10, validation: 4, test: 4}\n")
    (tmp_path / "tiny.yaml").write_text(SPACE)
    opts = dict(budget="1cpu-h", space="tiny.yaml", data="specs/data.yaml", data_dir="datasets", workdir="runs",
                study="s")
    study, space, layers, created = prepare(StartOptions(model="./mymodel", **opts))
    assert created and layers == 2 and space.model == str(tmp_path / "mymodel")
    settings = json.loads((tmp_path / "runs" / "s" / "study.json").read_text())
    assert settings["model"] == str(tmp_path / "mymodel") and settings["data_dir"] == str(tmp_path / "datasets")
    assert settings["space"] == str(tmp_path / "tiny.yaml")
    assert settings["data"]["data_dir"] == str(tmp_path / "datasets")
    assert settings["data"]["tasks"][0]["path"] == str(tmp_path / "specs" / "data" / "mine.jsonl")
    for text in _strings(settings):  # whatever names a file or folder here is absolute
        assert not Path(text).exists() or Path(text).is_absolute(), text
    assert load_space(tmp_path / "runs" / "s" / "space.yaml").model == str(tmp_path / "mymodel")
    # resume: ./mymodel and its absolute path are the same model, from any working folder
    monkeypatch.chdir(tmp_path / "specs")
    again = {**opts, "space": str(tmp_path / "tiny.yaml"), "data": "data.yaml", "workdir": str(tmp_path / "runs"),
             "data_dir": "../datasets"}
    assert prepare(StartOptions(model=str(tmp_path / "mymodel"), **again))[3] is False
    monkeypatch.chdir(tmp_path)
    assert prepare(StartOptions(model="./mymodel", **opts))[3] is False
    save_tiny(tmp_path / "other")
    with pytest.raises(StudyError, match="was started with model"):
        prepare(StartOptions(model="other", **opts))


def test_a_space_files_data_paths_are_taken_from_its_folder(tmp_path, monkeypatch):
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.yaml").write_text(SPACE.replace(
        "data: {seed: 0, tasks: [{name: sst2, train: 16, validation: 8, test: 8}]}",
        "data: {data_dir: ../datasets, tasks: [{name: mine, path: ../mine.jsonl, test_path: ~/t.jsonl, "
        "format: classification, labels: [a, b], train: 4, validation: 2, test: 2}]}"))
    monkeypatch.chdir(tmp_path / "spaces")
    data = load_space("s.yaml").data
    assert data["data_dir"] == str(tmp_path / "datasets")
    assert data["tasks"][0]["path"] == str(tmp_path / "mine.jsonl")
    assert data["tasks"][0]["test_path"] == str(Path("~/t.jsonl").expanduser())
