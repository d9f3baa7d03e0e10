"""``allocsearch bench layers`` and ``bench trial``: the rows and ratios they print (tiny sizes), the FFN-block
section's cases built through the real injector, ``preset:scope`` entries, and one-line errors before any
model loads."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from allocsearch.cli import cli
from test_cli import _isolated, assert_one_error_line, run_main  # noqa: F401 - _isolated is an autouse fixture


# ----------------------------------------------------------------------------------------------- bench layers


def test_bench_layers_json():
    from allocsearch.bench.layers import default_cases

    r = CliRunner().invoke(cli, ["bench", "layers", "--tokens", "32", "--repeats", "1", "--warmup", "0",
                                 "--shape", "32x48", "--json", "--threads", "1", "--ffn", "none"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    names = [c.name for c in default_cases()]
    assert [row["case"] for row in rows] == names  # --ffn none: no FFN-block rows
    by_name = {row["case"]: row for row in rows}
    for row in rows:
        assert row["shape"] == "32->48" and row["tokens"] == 32 and row["repeats"] == 1
        assert row["device"] == "cpu" and row["dtype"] == "fp32"
        assert row["median_ms"] > 0
        if row["reference"]:
            assert row["reference"] in by_name
            assert row["ratio"] == pytest.approx(row["median_ms"] / by_name[row["reference"]]["median_ms"])
            assert row["ratio"] > 0
        else:
            assert row["ratio"] is None
    assert sum(1 for row in rows if row["reference"]) >= 5


def test_bench_layers_ffn_section_json():
    """The FFN-block section runs after the Linear cases, in its own rows (shape "ffn DxF"), with every ratio
    taken against a case of the same section and run: the block forms against their per-Linear forms."""
    from allocsearch.bench import ffn, layers

    r = CliRunner().invoke(cli, ["bench", "layers", "--ffn", "16x32", "--tokens", "8", "--repeats", "1",
                                 "--warmup", "0", "--shape", "8x8", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["case"] for row in rows if row["shape"] == "8->8"] == [c.name for c in layers.default_cases()]
    block = [row for row in rows if row["shape"] == "ffn 16x32"]
    assert len(rows) == len(layers.default_cases()) + len(block)
    assert [row["case"] for row in block] == [c.name for c in ffn.default_cases()] == [
        "frozen MLP only", "LoRA r16 (peft)", "MoLA top-2 of 8, r8, per-Linear", "MixLoRA block: MoLA top-2 of 8, r8",
        "GraphLoRA top-2 of 8, r8, per-Linear", "GraphLoRA block top-2 of 8, r8"]
    ms = {row["case"]: row["median_ms"] for row in block}
    refs = {row["case"]: (row["reference"], row["also"]) for row in block}
    assert refs["MixLoRA block: MoLA top-2 of 8, r8"][0] == "MoLA top-2 of 8, r8, per-Linear"
    assert refs["GraphLoRA block top-2 of 8, r8"][0] == "GraphLoRA top-2 of 8, r8, per-Linear"
    assert refs["MoLA top-2 of 8, r8, per-Linear"] == ("LoRA r16 (peft)", {})
    for row in block:
        assert row["tokens"] == 8 and row["repeats"] == 1 and row["median_ms"] > 0
        if row["reference"]:
            assert row["ratio"] == pytest.approx(row["median_ms"] / ms[row["reference"]])
        else:
            assert row["ratio"] is None
        for name, ratio in row["also"].items():
            assert ratio == pytest.approx(row["median_ms"] / ms[name])
    for name in ("MixLoRA block: MoLA top-2 of 8, r8", "GraphLoRA block top-2 of 8, r8"):
        assert set(refs[name][1]) == {"LoRA r16 (peft)"}


def _routers(module):
    names = [n.rsplit(".", 1)[-1] for n, _ in module.named_parameters()]
    return names.count("router"), names.count("token_in")


def test_bench_ffn_cases_time_the_injected_forms():
    """Each FFN case is the MLP as a trial gets it: the block cases are the ffn_block classes with ONE router,
    the per-Linear cases wrap gate/up/down with one router each; all compute the frozen MLP at init (B = 0)
    and the timed backward reaches every trainable parameter."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from allocsearch.bench import ffn
    from allocsearch.moe.ffn_block import GraphLoRAFFNBlock, MoLAFFNBlock
    from allocsearch.moe.graphlora import GraphLoRALinear
    from allocsearch.moe.mola import MoLALinear

    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    built = {}
    for case in ffn.default_cases():
        torch.manual_seed(0)
        model = ffn.mlp_model(16, 32)
        expected = model.layers[0].mlp(x).detach()
        built[case.name] = module = case.build(model).train()
        torch.testing.assert_close(module(x), expected)
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert bool(trainable) == (case.name != "frozen MLP only"), case.name
        loss = module(x).sum()  # + GraphLoRA's Poisson / Normal losses: the only path to lambda and sigma
        loss = loss + sum(m.aux_loss for m in module.modules() if getattr(m, "aux_loss", None) is not None)
        loss.backward()
        assert all(p.grad is not None for p in trainable), case.name
    mola_block, graph_block = built["MixLoRA block: MoLA top-2 of 8, r8"], built["GraphLoRA block top-2 of 8, r8"]
    mola_lin, graph_lin = built["MoLA top-2 of 8, r8, per-Linear"], built["GraphLoRA top-2 of 8, r8, per-Linear"]
    assert type(mola_block) is MoLAFFNBlock and type(graph_block) is GraphLoRAFFNBlock
    assert mola_block.top_k == 2 and mola_block.num_experts == 8 and mola_block.rank == 8
    assert mola_block.projections == ("gate", "up", "down") and graph_block.projections == ("gate", "up", "down")
    assert _routers(mola_block) == (1, 0) and _routers(graph_block) == (0, 1)
    for module, cls in ((mola_lin, MoLALinear), (graph_lin, GraphLoRALinear)):
        assert isinstance(module, LlamaMLP)
        assert all(type(getattr(module, f"{p}_proj")) is cls for p in ("gate", "up", "down"))
    assert _routers(mola_lin) == (3, 0) and _routers(graph_lin) == (0, 3)
    # same experts in both MoLA forms: the per-Linear form has 3 routers (8 x 16 on gate, up; 8 x 32 on down)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(mola_lin) - count(mola_block) == 8 * 16 + 8 * 16 + 8 * 32 - 8 * 16
    assert count(mola_block) == 8 * 8 * (16 + 32) * 3 + 8 * 16


@pytest.mark.parametrize("args, needle", [
    (["--shape", "12"], "--shape '12' is not d_inxd_out"),
    (["--shape", "axb"], "--shape 'axb'"),
    (["--dtype", "fp8"], "fp8"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--shape", "1x2x3"], "--"),
    (["--ffn", "576"], "--ffn '576' is not dxd_ff"),
    (["--ffn", "0x16"], "--ffn '0x16': sizes must be >= 1"),
    (["--ffn", "none", "--ffn", "16x32"], "--ffn none skips the FFN-block section: give it alone"),
])
def test_bench_layers_bad_input(capsys, args, needle):
    code, out, err = run_main(["bench", "layers", "--tokens", "8", "--repeats", "1", "--warmup", "0", *args], capsys)
    assert code == 2 and out == ""
    assert_one_error_line(code, err, needle)


# ----------------------------------------------------------------------------------------------- bench trial


def test_bench_trial_json(capsys):
    code, out, err = run_main(["bench", "trial", "--model", "tiny-llama", "--methods", "mola", "--steps", "1",
                               "--warmup", "1", "--rounds", "1", "--max-length", "32", "--batch-size", "2",
                               "--threads", "1", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["method"] == "mola" and row["reference"].startswith("LoRA r") and row["rounds"] == 1
    assert row["time_ratio"] > 0 and row["peak_ratio"] > 0
    assert row["time_ratio"] == pytest.approx(row["moe"]["step_s"] / row["lora"]["step_s"])
    # tiny-llama: MoLA preset 174,080 trainable parameters; LoRA has 4 layers x 1024 (d_in + d_out) per rank
    rank = int(row["reference"].split()[1][1:])
    assert row["moe"]["trainable"] == 174_080 and row["lora"]["trainable"] == rank * 4 * 1024
    assert abs(row["params_ratio"] - 1) < 0.05
    assert row["moe"]["peak_mb"] > 0 and row["lora"]["peak_mb"] > 0


def test_bench_trial_unknown_method(capsys):
    code, out, err = run_main(["bench", "trial", "--methods", "mola,bogus"], capsys)
    assert code == 2 and out == ""
    assert_one_error_line(code, err, "bogus")


@pytest.mark.parametrize("methods, needles", [
    ("graphlora,graphlora:bogus", ["'graphlora:bogus'", "unknown router scope 'bogus'", "graphlora:linear"]),
    ("graphlora:", ["unknown router scope ''", "graphlora:ffn_block"]),
    ("omoe:ffn_block", ["'omoe:ffn_block'", "cannot take router_scope ffn_block", "write omoe or omoe:linear"]),
    ("lora:ffn_block", ["cannot take router_scope ffn_block", "write lora or lora:linear"]),
    ("bogus:linear", ["unknown preset 'bogus'", "PRESET:SCOPE"]),
])
def test_bench_trial_bad_scope_is_one_line_before_any_model_loads(capsys, monkeypatch, methods, needles):
    import allocsearch.training.models

    monkeypatch.setattr(allocsearch.training.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, out, err = run_main(["bench", "trial", "--methods", methods], capsys)
    assert code == 2 and out == ""
    assert_one_error_line(code, err, *needles)


def test_bench_trial_method_entry_sets_the_router_scope():
    """``PRESET:SCOPE`` is the preset with router_scope overridden; the name alone keeps the preset's own."""
    from allocsearch.bench.trial import method_entry
    from allocsearch.moe.ffn_block import GraphLoRAFFNBlock
    from allocsearch.moe.graphlora import GraphLoRALinear
    from allocsearch.moe.inject import inject
    from allocsearch.allocation.config import resolve_allocation
    from conftest import tiny_llama

    linear = method_entry("graphlora:linear")
    assert linear["label"] == "graphlora (linear)" and linear["router_scope"] == "linear"
    alloc = resolve_allocation(linear["allocation"], 2)
    assert alloc.method == "graphlora" and alloc.router_scope == "linear" and alloc.preset == "graphlora"
    assert (alloc.experts, alloc.top_k, alloc.rank) == ([8, 8], [2, 2], [2, 2])  # the rest of the preset kept
    own = method_entry("graphlora")
    assert own["label"] == "graphlora (ffn_block)"
    assert resolve_allocation(own["allocation"], 2).router_scope == "ffn_block"
    mix = resolve_allocation(method_entry(" mixlora : linear ")["allocation"], 2)
    assert mix.router_scope == "linear" and mix.moe_targets == ["gate", "up", "down"]
    assert resolve_allocation(method_entry("mola:ffn_block")["allocation"], 2).router_scope == "ffn_block"

    model = tiny_llama(layers=2)
    inject(model, alloc)
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate_proj) is GraphLoRALinear and type(model.model.layers[1].self_attn.q_proj) is GraphLoRALinear
    block = tiny_llama(layers=2)
    inject(block, resolve_allocation(own["allocation"], 2))
    assert type(block.model.layers[0].mlp) is GraphLoRAFFNBlock


def test_bench_trial_compares_both_forms_each_with_its_own_matched_lora(capsys, monkeypatch):
    """graphlora and graphlora:linear run as two configurations (a repeat of the same one is dropped), each
    against the LoRA rank matched to its own parameter count; the table names the scope."""
    import allocsearch.bench.trial as trial_bench
    from allocsearch.training import models
    from allocsearch.allocation.config import resolve_allocation

    seen = []

    def fake_worker(config):
        seen.append(config["allocation"])
        return {"step_seconds": [0.5 if config["allocation"].get("method") == "lora" else 1.0], "peak_mb": 200.0,
                "base_mb": 100.0, "trainable": 1000, "method": "x"}

    monkeypatch.setattr(trial_bench, "_run_worker", fake_worker)
    monkeypatch.setenv("COLUMNS", "220")
    code, out, err = run_main(["bench", "trial", "--model", "tiny-llama", "--rounds", "1", "--methods",
                               "graphlora,graphlora:linear,graphlora:ffn_block", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["label"], r["method"], r["router_scope"]) for r in rows] == [
        ("graphlora (ffn_block)", "graphlora", "ffn_block"), ("graphlora (linear)", "graphlora", "linear")]
    loaded = models.load_model("tiny-llama", task="causal-lm", device="cpu", dtype="fp32")
    for row, spec in zip(rows, ({"preset": "graphlora"}, {"preset": "graphlora", "router_scope": "linear"})):
        rank, moe_params, _ = trial_bench.matched_lora_rank(loaded, spec)
        assert row["reference"] == f"LoRA r{rank} (peft)" and row["time_ratio"] == pytest.approx(2.0)
        assert resolve_allocation(spec, loaded.num_layers).router_scope == row["router_scope"]
        row["moe_params"] = moe_params
    # per Linear: a graph router on each of the 7 targets instead of one per block, experts on attention too
    assert rows[1]["moe_params"] > rows[0]["moe_params"]
    assert rows[0]["reference"] != rows[1]["reference"]
    assert {"preset": "graphlora", "router_scope": "linear"} in seen and {"preset": "graphlora"} in seen
    assert len(seen) == 4  # 2 forms + 2 matched LoRAs, one round; graphlora:ffn_block was graphlora again
    code, out, err = run_main(["bench", "trial", "--model", "tiny-llama", "--rounds", "1", "--methods",
                               "graphlora,graphlora:linear"], capsys)
    assert code == 0, err
    assert "graphlora (ffn_block)" in out and "graphlora (linear)" in out
