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


def summary_writer(monitor):
    """DeepSpeed's own TensorBoard writer (rank 0, TensorBoard enabled), for what scalars cannot show; else None."""
    if monitor is None or not getattr(monitor, "enabled", False):
        return None
    return getattr(getattr(monitor, "tb_monitor", None), "summary_writer", None)


def write_rank_histogram(monitor, ranks: dict[str, int], step: int) -> None:
    """The live ranks of every module as one histogram: the allocation at a glance, beside the per-module cards."""
    writer = summary_writer(monitor)
    if writer is not None and ranks:
        import torch

        writer.add_histogram("DynRank/live_ranks", torch.tensor(list(ranks.values()), dtype=torch.float32), step)
        writer.flush()


def write_image(monitor, tag: str, image, step: int) -> None:
    """An RGB image [H, W, 3] (uint8 array) under `tag`."""
    writer = summary_writer(monitor)
    if writer is not None:
        writer.add_image(tag, image, step, dataformats="HWC")
        writer.flush()


def scalar_events(prefix: str, values: dict[str, float], step: int) -> list[Event]:
    return [(f"{prefix}/{key}", float(value), step) for key, value in values.items()]


def write(monitor, events: list[Event]) -> None:
    """DeepSpeed's MonitorMaster writes on global rank 0 only; a disabled monitor makes this a no-op."""
    if monitor is not None and getattr(monitor, "enabled", False) and events:
        monitor.write_events(events)
