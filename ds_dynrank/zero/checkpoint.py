"""DeepSpeed checkpoint formats as we read them without an engine: a consolidated fp32 state of any ZeRO stage, and
the per-tensor files of the universal format (for the buffers its loader leaves out), and what a save leaves out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def consolidated_state(root, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 trainable tensors and buffers of a DeepSpeed checkpoint, any ZeRO stage, without an engine."""
    tag_dir = Path(root) / tag
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True)
    else:  # ZeRO-0: the module state dict is whole in the model states file
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def restore_universal_buffers(model: torch.nn.Module, root: Path, tag: str) -> int:
    """DeepSpeed's universal loading restores parameters and optimizer state but not module buffers, and our rank
    masks (and the adapters module allocation holds as buffers) are buffers: copy them from the converted
    checkpoint's per-tensor files (`zero/<name>/fp32.pt`). Returns how many were restored."""
    restored = 0
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            path = Path(root) / tag / "zero" / name / "fp32.pt"
            if path.is_file():
                buffer.copy_(torch.load(path, weights_only=False)["param"].view_as(buffer).to(buffer.dtype))
                restored += 1
    return restored


@contextmanager
def trainable_state_only(engine) -> Iterator[None]:
    """While saving, leave every frozen parameter out of the module state, under all of its names. DeepSpeed's
    `exclude_frozen_parameters` drops frozen weights by their `named_parameters()` name, which lists a tied weight
    once: a frozen, tied `lm_head.weight` (SmolLM2, Qwen2.5, Gemma) was saved again in every checkpoint (113 MB
    of the default job's 146). The model source gives all of them back at load."""
    frozen = [
        name
        for name, t in engine.module.state_dict(keep_vars=True).items()
        if isinstance(t, torch.nn.Parameter) and not t.requires_grad
    ]
    saving = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        state = saving(*args, **kwargs)
        for name in frozen:
            state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict  # this engine only, for this save only
    try:
        yield
    finally:
        del engine.module_state_dict
