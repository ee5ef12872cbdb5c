"""TensorBoard events through DeepSpeed's own monitor (rank 0 writes; the x axis is DeepSpeed's global samples)."""

from __future__ import annotations

from ds_dynrank.lora import LoRALinear

Event = tuple[str, float, int]


def rank_events(adapters: list[tuple[str, LoRALinear]], step: int) -> list[Event]:
    """Live rank of every adapted module, and their sum (the rank budget in use)."""
    events = [(f"DynRank/rank/{name}", float(layer.rank), step) for name, layer in adapters]
    events.append(("DynRank/budget/rank_total", float(sum(layer.rank for _, layer in adapters)), step))
    return events


def scalar_events(prefix: str, values: dict[str, float], step: int) -> list[Event]:
    return [(f"{prefix}/{key}", float(value), step) for key, value in values.items()]


def write(monitor, events: list[Event]) -> None:
    """DeepSpeed's MonitorMaster writes on global rank 0 only; a disabled monitor makes this a no-op."""
    if monitor is not None and getattr(monitor, "enabled", False) and events:
        monitor.write_events(events)
