"""Export the adapters as a stock PEFT LoRA directory that `PeftModel.from_pretrained` loads unchanged.

Per module, only live slots are written, gates are folded into B, and the scaling is carried by `alpha_pattern`
(alpha = our scaling x live rank, so PEFT's alpha / r reproduces it exactly); per-module ranks go to
`rank_pattern`. Modules with no live rank are left out. Writes are atomic: a temporary directory renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ds_dynrank.lora import Conv1D, LoRALinear

PEFT_PREFIX = "base_model.model."


def peft_tensors(adapters: list[tuple[str, LoRALinear]], full: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(state dict, rank_pattern, alpha_pattern) in PEFT's format. `full` maps `<module>.lora_A|B|gate` to full
    fp32 values (as read through zero.read_full_fp32_flat on every rank)."""
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in adapters:
        live = layer.live_slots()
        if not live:
            continue
        a, b = full[f"{name}.lora_A"][live], full[f"{name}.lora_B"][:, live]
        if layer.lora_gate is not None:
            b = b * full[f"{name}.lora_gate"][live]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = len(live)
        alphas[name] = layer.scaling * len(live)
    return tensors, ranks, alphas


def write_peft_adapter(out: Path, adapters: list[tuple[str, LoRALinear]], full: dict[str, torch.Tensor], *,
                       base_model: str) -> Path:  # fmt: skip
    """Write `adapter_config.json` (through PEFT's own LoraConfig) and `adapter_model.safetensors` into `out`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, ranks, alphas = peft_tensors(adapters, full)
    if not ranks:
        raise ValueError("no adapted module has a live rank: nothing to export")
    first = next(iter(ranks))
    config = LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        target_modules=sorted(ranks),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        lora_dropout=max(layer.dropout_p for _, layer in adapters),
        fan_in_fan_out=any(Conv1D and isinstance(layer.base, Conv1D) for _, layer in adapters),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gather_full(adapters: list[tuple[str, LoRALinear]]) -> dict[str, torch.Tensor]:
    """Every adapter tensor's full fp32 value, any ZeRO stage, in one collective (call on every rank)."""
    from ds_dynrank.zero import full_numel, full_shape, read_full_fp32_flat

    keys, params = [], []
    for name, layer in adapters:
        for key in ("lora_A", "lora_B", "lora_gate"):
            if getattr(layer, key) is not None:
                keys.append(f"{name}.{key}")
                params.append(getattr(layer, key))
    flat = read_full_fp32_flat(params)
    parts = flat.split([full_numel(p) for p in params])
    return {k: part.view(full_shape(p)) for k, part, p in zip(keys, parts, params)}
