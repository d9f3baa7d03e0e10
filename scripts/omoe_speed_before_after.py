"""Issue 8: did OMoE's stable form (float64 k x k Gram, collinear_tol; commit f94e581) give back speed?
Times forward+backward of one wrapped Linear for the layer before that commit (read from git) and now,
round-robin in one process, medians; LoRA r32 (peft) and MoLA 2 soft r16 (no orthogonalisation) as
references. Usage: python3 scripts/omoe_speed_before_after.py [REPEATS]  (needs the git history)."""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from allocsearch.allocation.config import AllocationConfig
from allocsearch.bench.layers import _ours, _peft_lora, _time_once  # noqa: E402
from allocsearch.allocation.methods import get_method  # noqa: E402

source = subprocess.run(["git", "show", "f94e581^:allocsearch/moe/omoe.py"], cwd=REPO, check=True,
                        capture_output=True, text=True).stdout
old_file = Path(tempfile.mkdtemp()) / "omoe_old.py"
old_file.write_text(source)
spec = importlib.util.spec_from_file_location("omoe_old", old_file)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
torch.set_num_threads(2)
tokens, repeats, warmup = 2048, int(sys.argv[1]) if len(sys.argv) > 1 else 15, 3

def build(cls):
    def b(base):
        alloc = AllocationConfig.uniform("omoe", 1, experts=2, top_k=2, rank=16, dropout=0.0, targets=["q"],
                                         options={"placement": "all"})
        return cls(base, experts=2, top_k=2, rank=16, alpha=32.0, dropout=0.0, options=alloc.options,
                   layer_index=0, num_layers=1, target="q")
    return b

cases = {"LoRA r32 (peft)": _peft_lora(32), "OMoE before (fp32 Gram)": build(old.OMoELinear),
         "OMoE after (fp64 Gram, tol)": build(get_method("omoe").layer_class()),
         "MoLA 2 soft r16 (no orthogonalisation)": _ours("mola", 2, 2, 16)}
for d_in, d_out in ((576, 576), (576, 1536)):
    torch.manual_seed(0)
    fns = {}
    for n, bld in cases.items():
        fns[n] = bld(nn.Linear(d_in, d_out, bias=False)).train()
    with torch.no_grad():  # non-zero B so the Gram-Schmidt path is exercised like after training
        for n, f in fns.items():
            for name, p in f.named_parameters():
                if "lora_B" in name or "B" == name[-1:]:
                    p.normal_(0, 0.02)
    x, g = torch.randn(tokens, d_in, requires_grad=True), torch.randn(tokens, d_out)
    times = {n: [] for n in cases}
    for r in range(warmup + repeats):
        for n in cases:
            ms = _time_once(fns[n], x, g, torch.device("cpu"))
            if r >= warmup:
                times[n].append(ms)
    med = {n: statistics.median(v) for n, v in times.items()}
    for n in cases:
        print(f"{d_in}->{d_out}  {n:40s} {med[n]:8.2f} ms  vs LoRA r32 {med[n]/med['LoRA r32 (peft)']:.2f}x  "
              f"vs before {med[n]/med['OMoE before (fp32 Gram)']:.2f}x")
