"""TensorBoard events through DeepSpeed's own monitor (rank 0 writes; the x axis is DeepSpeed's global samples)."""

from __future__ import annotations

Event = tuple[str, float, int]


def allocation_events(entry: dict, target_budget: float, step: int) -> list[Event]:
    """One allocation-history entry as TensorBoard scalars: every module's live rank, their sum, the budget in use
    and its target, slots moved, parameters that train, and (module allocation) how many modules train."""
    events = [(f"DynRank/rank/{name}", float(rank), step) for name, rank in entry["ranks"].items()]
    events += [
        ("DynRank/budget/rank_total", float(sum(entry["ranks"].values())), step),
        ("DynRank/budget/used", float(entry["budget"]), step),
        ("DynRank/budget/target", float(target_budget), step),
        ("DynRank/slots_changed", float(entry["slots_changed"]), step),
        ("DynRank/trainable_parameters", float(entry["trainable_parameters"]), step),
    ]
    if "active" in entry:
        events.append(("DynRank/active_modules", float(sum(entry["active"].values())), step))
    return events


def scalar_events(prefix: str, values: dict[str, float], step: int) -> list[Event]:
    return [(f"{prefix}/{key}", float(value), step) for key, value in values.items()]


def write(monitor, events: list[Event]) -> None:
    """DeepSpeed's MonitorMaster writes on global rank 0 only; a disabled monitor makes this a no-op."""
    if monitor is not None and getattr(monitor, "enabled", False) and events:
        monitor.write_events(events)
