"""Wrap a Hugging Face model's target Linears per an allocation; freeze the rest; save and load adapters.

``inject(model, allocation)`` finds the model's transformer blocks (the ``nn.ModuleList`` with
``config.num_hidden_layers`` entries), resolves each target's short name (``q`` -> ``self_attn.q_proj``
for Llama-style decoders, ``query`` -> ``attention.self.query`` for BERT, or a dotted path inside the
block), and replaces it with the method's layer for that block's experts / top-k / rank. LoRA and DoRA go
through ``peft`` itself. The returned :class:`Adapter` is what a trainer needs: the model to run, the
trainable parameters (found by visiting the layer objects), the auxiliary loss of the last forward,
expert-load statistics, LoRACoE's phase switch, and ``save`` / :func:`load_adapter`.
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

from allocsearch.allocation import MODEL_FAMILIES, AllocationConfig, AllocationError
from allocsearch.methods import get_method
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
    """``(layer index, target short name, full module path)`` for every Linear to wrap, checked."""
    prefix, blocks = find_blocks(model)
    if len(blocks) != allocation.num_layers:
        raise AllocationError(f"the allocation is for {allocation.num_layers} layers but "
                              f"{type(model).__name__} has {len(blocks)}: rebuild it with num_layers={len(blocks)}")
    aliases = FAMILY_TARGETS.get(model_family(model) or "", {})
    out = []
    for j, block in enumerate(blocks):
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


def inject(model: nn.Module, allocation: AllocationConfig, *, train_modules: tuple[str, ...] = ()) -> Adapter:
    """Freeze ``model`` and wrap its target Linears per ``allocation`` (in place; peft wraps the model).

    ``train_modules``: module names kept trainable and saved with the adapter (e.g. a classifier head).
    """
    spec = get_method(allocation.method)
    if allocation.router_scope == "ffn_block":  # one router per decoder layer on its MLP (GraphLoRA, MixLoRA)
        from allocsearch.moe.ffn_block import inject_ffn_blocks

        return inject_ffn_blocks(model, allocation, train_modules=tuple(train_modules))
    targets = resolve_targets(model, allocation)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.peft:
        return Adapter(_inject_peft(model, allocation, targets, train_modules), allocation, {}, tuple(train_modules))
    layer_cls = spec.layer_class()
    layers: dict[str, MoELoRALayer] = {}
    for j, target, path in targets:
        moe = allocation.is_moe_target(target)
        layers[path] = replace_module(model, path, lambda base: layer_cls(
            base, experts=allocation.experts[j] if moe else 1, top_k=allocation.top_k[j] if moe else 1,
            rank=allocation.rank[j], alpha=allocation.alpha, dropout=allocation.dropout,
            options=allocation.options, layer_index=j, num_layers=allocation.num_layers, target=target))
    return adapter_of(model, allocation, layers, train_modules)


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


def _inject_peft(model, allocation, targets, train_modules):
    from peft import LoraConfig, get_peft_model  # ~7 s to import: only for the peft methods

    names = [path for _, _, path in targets]
    ranks = {path: allocation.rank[j] for j, _, path in targets}
    base_rank = allocation.rank[0]
    config = LoraConfig(r=base_rank, lora_alpha=allocation.alpha, lora_dropout=allocation.dropout,
                        target_modules=names, use_dora=allocation.method == "dora", bias="none",
                        rank_pattern={k: v for k, v in ranks.items() if v != base_rank},
                        modules_to_save=list(train_modules) or None)
    training = model.training
    return get_peft_model(model, config).train(training)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> Adapter:
    """Inject the allocation saved at ``path`` into a fresh ``model`` and load the saved weights."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AllocationError(f"{path} is not an allocsearch adapter (no {CONFIG_FILE}): pass the directory "
                              f"written by Adapter.save or `allocsearch train --out`")
    allocation = AllocationConfig.load(path / CONFIG_FILE)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    train_modules = tuple(meta.get("train_modules", ()))
    if get_method(allocation.method).peft:
        from peft import PeftModel

        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = PeftModel.from_pretrained(model, path / PEFT_DIR).train(model.training)
        return Adapter(peft_model, allocation, {}, train_modules)
    adapter = inject(model, allocation, train_modules=train_modules)
    from safetensors.torch import load_file

    saved = load_file(path / ADAPTER_FILE)
    own = adapter._state()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    # GraphLoRA's running activation total is training state added later: older adapters start it at zero
    missing = [k for k in missing if not k.endswith(".activation_total")]
    if missing or unexpected:
        raise AllocationError(f"{path / ADAPTER_FILE} does not match its allocation: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, tensor in own.items():
            if key in saved:
                tensor.copy_(saved[key].to(tensor.dtype))
    return adapter
