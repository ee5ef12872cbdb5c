"""The only package that touches DeepSpeed's partitioned state and internals: state.py (full-shape reads and writes
of adapter tensors, masters and moments), engine.py (rebuilding an engine for the physical backend), checkpoint.py
(DeepSpeed's checkpoint formats read without an engine)."""

from ds_dynrank.zero.state import (
    FullState,
    StateIO,
    full_numel,
    full_shape,
    read_full_fp32,
    read_full_fp32_flat,
    working_copies,
)

__all__ = [
    "FullState",
    "StateIO",
    "full_numel",
    "full_shape",
    "read_full_fp32",
    "read_full_fp32_flat",
    "working_copies",
]
