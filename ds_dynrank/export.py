"""Export the adapters as a stock PEFT LoRA directory that `PeftModel.from_pretrained` loads unchanged.

Per module, only live slots are written, gates are folded into B, and the scaling is carried by `alpha_pattern`
(alpha = our scaling x live rank, so PEFT's alpha / r reproduces it exactly); per-module ranks go to
`rank_pattern`. Modules with no live rank are left out. Writes are atomic: a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_dynrank.lora import Conv1D, LoRALinear, adapter_state_tensors
from ds_dynrank.rundir import follow_umask, temp_sibling

PEFT_PREFIX = "base_model.model."
SERVING_FILE = "dynrank_serving.json"
# vLLM serves LoRA only at these max_lora_rank values, and pre-allocates every adapter at that maximum
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def serving_note(ranks: dict[str, int]) -> dict:
    """What serving the adapter takes: its largest module rank, and the smallest vLLM max_lora_rank that holds it
    (None above vLLM's largest): a heterogeneous adapter costs its largest module's rank at serving time."""
    largest = max(ranks.values())
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= largest]
    return {"max_module_rank": largest, "vllm_max_lora_rank": fits[0] if fits else None,
            "modules": len(ranks), "total_rank": sum(ranks.values())}  # fmt: skip


@dataclass(frozen=True)
class ExportModule:
    """One adapted module as the export needs it: full fp32 tensors, live mask and scaling."""

    name: str
    lora_A: torch.Tensor  # [R, I]
    lora_B: torch.Tensor  # [O, R]
    gate: torch.Tensor | None  # [R]
    mask: torch.Tensor  # [R]
    scaling: float


def from_adapters(adapters: list[tuple[str, LoRALinear]], full: dict[str, torch.Tensor]) -> list[ExportModule]:
    """Export view of live layers; `full` maps `<module>.lora_A|lora_B|lora_gate` to full fp32 values."""
    return [
        ExportModule(
            name,
            full[f"{name}.lora_A"],
            full[f"{name}.lora_B"],
            full.get(f"{name}.lora_gate"),
            layer.rank_mask.detach().float().cpu(),
            layer.scaling,
        )
        for name, layer in adapters
    ]


def from_state_dict(state: dict[str, torch.Tensor], scaling: dict[str, float]) -> list[ExportModule]:
    """Export view of a consolidated checkpoint state dict (module names from the scaling table)."""
    return [
        ExportModule(
            name,
            state[f"{name}.lora_A"],
            state[f"{name}.lora_B"],
            state.get(f"{name}.lora_gate"),
            state[f"{name}.rank_mask"].float(),
            scale,
        )
        for name, scale in sorted(scaling.items())
    ]


def peft_tensors(modules: list[ExportModule]) -> tuple[dict, dict, dict]:
    """(state dict, rank_pattern, alpha_pattern) in PEFT's format, live slots only, gates folded into B."""
    tensors, ranks, alphas = {}, {}, {}
    for m in modules:
        live = torch.nonzero(m.mask).flatten().tolist()
        if not live:
            continue
        a, b = m.lora_A[live].float(), m.lora_B[:, live].float()
        if m.gate is not None:
            b = b * m.gate[live].float()
        tensors[f"{PEFT_PREFIX}{m.name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{m.name}.lora_B.weight"] = b.contiguous()
        ranks[m.name] = len(live)
        alphas[m.name] = m.scaling * len(live)
    return tensors, ranks, alphas


def write_peft_adapter(
    out: Path, modules: list[ExportModule], *, base_model: str, dropout: float = 0.0, fan_in_fan_out: bool = False
) -> Path:
    """Write `adapter_config.json` (through PEFT's own LoraConfig) and `adapter_model.safetensors` into `out`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, ranks, alphas = peft_tensors(modules)
    if not ranks:
        raise ValueError("no adapted module has a live rank: nothing to export")
    first = next(iter(ranks))
    config = LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        target_modules=sorted(ranks),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        lora_dropout=dropout,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    out = Path(out)
    tmp = temp_sibling(out, directory=True)
    try:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / SERVING_FILE).write_text(json.dumps(serving_note(ranks), indent=2) + "\n")
        follow_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_settings(adapters: list[tuple[str, LoRALinear]]) -> dict:
    """The LoraConfig fields that depend on the layers: dropout and Conv1D's transposed weights."""
    return {
        "dropout": max(layer.dropout_p for _, layer in adapters),
        "fan_in_fan_out": any(Conv1D and isinstance(layer.base, Conv1D) for _, layer in adapters),
    }


def gather_full(adapters: list[tuple[str, LoRALinear]]) -> dict[str, torch.Tensor]:
    """Every adapter tensor's full fp32 value, any ZeRO stage, in one collective (call on every rank)."""
    from ds_dynrank.zero import full_numel, full_shape, read_full_fp32_flat

    keys = [f"{name}.{key}" for name, layer in adapters for key in layer.adapter_tensors()]
    params = adapter_state_tensors(adapters)  # buffers too: inactive modules (physical module allocation)
    flat = read_full_fp32_flat(params)
    parts = flat.split([full_numel(p) for p in params])
    return {k: part.view(full_shape(p)) for k, part, p in zip(keys, parts, params)}


def export_checkpoint(path: Path, out: Path) -> Path:
    """Export from a run's output directory (its latest checkpoint), a checkpoint root, or one tag directory,
    without building a model or an engine."""
    from ds_dynrank import checkpoint
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.zero.checkpoint import consolidated_state

    path = Path(path)
    checkpoints = RunDir(path).checkpoints
    root, tag = checkpoint.resolve(str(checkpoints if checkpoints.is_dir() else path), path)
    meta = checkpoint.read_meta(root, tag)
    modules = from_state_dict(consolidated_state(root, tag), meta["scaling"])
    return write_peft_adapter(
        out, modules, base_model=meta["base_model"], dropout=meta["dropout"], fan_in_fan_out=meta["fan_in_fan_out"]
    )
