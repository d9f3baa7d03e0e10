"""What an injected model is: its transformer blocks and target Linears (``find_blocks``, ``resolve_targets``),
and the :class:`Adapter` a trainer holds (the model to run, its trainable parameters found by visiting the layer
objects, the auxiliary loss, expert-load statistics, ``save``). Both injectors (per Linear in ``inject``, per FFN
block in ``ffn_block``) build on this module.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from allocsearch.allocation.config import MODEL_FAMILIES, AllocationConfig, AllocationError
from allocsearch.allocation.methods import get_method
from allocsearch.moe.base import MoELoRALayer, pooled_load_balance

FAMILY_TARGETS: dict[str, dict[str, str]] = {
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "bert": {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "dense": "attention.output.dense", "intermediate": "intermediate.dense", "output": "output.dense"},
}
ADAPTER_FILE, CONFIG_FILE, META_FILE, PEFT_DIR = "adapter.safetensors", "allocation.yaml", "adapter.json", "peft"


def model_family(model: nn.Module) -> str | None:
    return MODEL_FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the ModuleList whose length is ``config.num_hidden_layers``."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (depth is None or len(module) == depth):
            return name, module
    raise AllocationError(f"cannot find the transformer blocks of {type(model).__name__}: no ModuleList "
                          f"of num_hidden_layers={depth} modules")


def resolve_targets(model: nn.Module, allocation: AllocationConfig) -> list[tuple[int, str, str]]:
    """``(layer index, target short name, full module path)`` for every Linear to wrap (the adapted layers'
    targets), checked."""
    prefix, blocks = find_blocks(model)
    if len(blocks) != allocation.num_layers:
        raise AllocationError(f"the allocation is for {allocation.num_layers} layers but "
                              f"{type(model).__name__} has {len(blocks)}: rebuild it with num_layers={len(blocks)}")
    aliases = FAMILY_TARGETS.get(model_family(model) or "", {})
    out = []
    for j, block in enumerate(blocks):
        if not allocation.adapts(j):  # a frozen layer: nothing to wrap
            continue
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        for t in allocation.targets:
            rel = aliases.get(t, t)
            if rel not in linears:
                raise AllocationError(f"target {t!r} ({rel}) is not a Linear in block {j} of "
                                      f"{type(model).__name__}; its Linears are {sorted(linears)}")
            out.append((j, t, f"{prefix}.{j}.{rel}"))
    return out


class _PaddingMask:
    """Forward pre-hook on the adapted model: the batch's ``attention_mask`` (batch, positions), flattened in
    the order the layers flatten their input, becomes every MoE layer's ``token_mask``. Anything else (no
    mask, a 4-D mask, a generation step whose mask also covers the cache) sets None: every position counts."""

    def __init__(self, layers: list):
        self.layers = layers

    def __call__(self, module, args, kwargs):
        # transformers' forward(input_ids, attention_mask, ...): a keyword, or the second positional argument
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        flat = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for layer in self.layers:
            layer.token_mask = flat


@dataclass
class Adapter:
    """An injected adapter: run ``adapter.model``, optimise ``adapter.trainable_parameters()``."""

    model: nn.Module
    allocation: AllocationConfig
    layers: dict[str, MoELoRALayer] = field(default_factory=dict)  # module path -> layer; empty for peft
    train_modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.layers:  # routers count only real tokens: hand each forward's attention_mask to the layers
            self.model.register_forward_pre_hook(_PaddingMask(list(self.layers.values())), with_kwargs=True)

    @property
    def uses_peft(self) -> bool:
        return get_method(self.allocation.method).peft

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.uses_peft:
            return [p for p in self.model.parameters() if p.requires_grad]
        params = [p for layer in self.layers.values() for p in layer.adapter_parameters()]
        params += [p for name in self.train_modules for p in self.model.get_submodule(name).parameters()]
        return [p for p in params if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def num_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the layers' weighted auxiliary losses from the last training forward (then cleared); the
        Switch load balance is pooled per decoder layer (``pooled_load_balance``)."""
        total = pooled_load_balance(self.layers.values())
        for layer in self.layers.values():
            if layer.aux_loss is not None:
                total = total + layer.aux_loss
                layer.aux_loss = None
        return total

    def set_phase(self, phase: str) -> None:
        for layer in self.layers.values():
            layer.set_phase(phase)

    def track_load(self, on: bool = True) -> None:
        for layer in self.layers.values():
            layer.track_load = on
            layer.reset_load()

    def expert_load(self) -> dict[str, list[float]]:
        return {path: layer.expert_load() for path, layer in self.layers.items()}

    def redundancy(self) -> dict[str, float]:
        return {path: layer.redundancy() for path, layer in self.layers.items()}

    def summary(self) -> str:
        n, t = self.num_trainable(), self.num_total()
        a = self.allocation
        return (f"{a.method}: {len(self.layers) or 'peft'} wrapped modules, {a.total_experts} experts over "
                f"{a.num_layers} layers, trainable {n:,} of {t:,} parameters ({100 * n / t:.3f}%)")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the adapter (safetensors + its allocation config) into directory ``path``, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            self.allocation.save(tmp / CONFIG_FILE)
            (tmp / META_FILE).write_text(json.dumps({"train_modules": list(self.train_modules),
                                                     "format": "allocsearch-adapter"}, indent=2))
            if self.uses_peft:
                self.model.save_pretrained(tmp / PEFT_DIR)  # a peft-loadable adapter
            else:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in self._state().items()}, tmp / ADAPTER_FILE)
            from allocsearch.fileio import dir_mode, file_mode

            for item in (tmp, *tmp.rglob("*")):  # mkdtemp and safetensors make 0700 / 0600: follow the umask
                item.chmod(dir_mode() if item.is_dir() else file_mode())
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"{p}.{k}": v for p, layer in self.layers.items() for k, v in layer.adapter_state_dict().items()}
        for name in self.train_modules:
            state.update({f"{name}.{k}": v for k, v in self.model.get_submodule(name).state_dict().items()})
        return state


def replace_module(model: nn.Module, path: str, build) -> nn.Module:
    """Put ``build(current module at path)`` at ``path``, in the model's train/eval mode; returns it."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = build(getattr(parent, child))
    layer.train(model.training)  # new modules start in train mode: follow the model's mode
    setattr(parent, child, layer)
    return layer


def adapter_of(model: nn.Module, allocation: AllocationConfig, layers: dict, train_modules) -> Adapter:
    """The Adapter of injected ``layers``, with ``train_modules`` made trainable again."""
    for name in train_modules:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return Adapter(model, allocation, layers, tuple(train_modules))
