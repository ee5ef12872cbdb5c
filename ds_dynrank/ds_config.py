"""Resolve the few `"auto"` values our shipped DeepSpeed configs use, so one file runs on CPU and on GPUs.

DeepSpeed itself does not accept "auto"; we replace it before `deepspeed.initialize`, like the HF Trainer does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ds_dynrank.errors import UserInputError
from ds_dynrank.rundir import TENSORBOARD


def bf16_available(accel) -> bool:
    """What `"bf16": {"enabled": "auto"}` resolves to: on where the accelerator has bf16 and is not the CPU (bf16
    on the CPU accelerator is slower than fp32 and not what these configs test)."""
    return accel.device_name() != "cpu" and accel.is_bf16_supported()


def resolve(
    ds_config: dict[str, Any], *, max_steps: int, output_dir: Path | None, bf16_supported: bool
) -> dict[str, Any]:
    """A copy with `bf16.enabled: "auto"` (on where the accelerator has bf16 and is not the CPU), scheduler
    `total_num_steps: "auto"` (= --max_steps) resolved, and TensorBoard pointed at `output_dir` (when given).
    Resolving a resolved config changes nothing."""
    cfg = copy.deepcopy(ds_config)
    bf16 = cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(bf16_supported)
    params = cfg.get("scheduler", {}).get("params", {})
    for key in ("total_num_steps", "warmup_num_steps"):
        if params.get(key) == "auto":
            params[key] = max_steps if key == "total_num_steps" else max(1, max_steps // 10)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise UserInputError(f'--deepspeed: cannot resolve "auto" for {", ".join(leftover)}; give a value')
    tb = cfg.get("tensorboard")
    if isinstance(tb, dict) and tb.get("enabled") and output_dir is not None:
        tb["output_path"] = str(output_dir)
        tb.setdefault("job_name", TENSORBOARD)
    return cfg


def _walk(obj: Any, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, obj
