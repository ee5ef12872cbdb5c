"""`name+key=value+...`: a benchmark arm or variant with overrides of its method's own config section, as the
quality and cost benchmarks take them on the command line (`l1ra+l1_lambda=0.05`, `l1ra-masked+gate_lr=0.2`)."""

from __future__ import annotations

import json


def split_overrides(spec: str, flag: str) -> tuple[str, dict]:
    """('name', {'key': 0.05, 'other': 'text'}) from 'name+key=0.05+other=text': JSON values, or bare strings."""
    base, *pairs = spec.split("+")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: {spec!r}: expected name+key=value, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string, e.g. strategy=topk
    return base, overrides


def apply_overrides(section: dict, method: str, overrides: dict) -> dict:
    """The `"dynrank"` section with `overrides` merged into its method's own sub-section."""
    if not overrides:
        return section
    return {**section, method: {**section.get(method, {}), **overrides}}
