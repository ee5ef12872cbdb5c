"""`python -m ds_dynrank report RUN_DIR`: where did the rank go? Figures and a markdown summary from a run's files.

Reads `allocation_history.json` (one event per allocation, step 0 first) and, if present, `metrics.json`; writes
`rank_heatmap.png`, `rank_by_type.png`, `budget.png` and `summary.md` into `RUN_DIR/report/` (or `--out`).
Module names are read as `<...>.<layer index>.<...>.<type>`: the first integer path component is the layer and the
last component the type (`model.layers.3.mlp.down_proj` -> layer 3, `down_proj`). Names without an integer go in
layer "-". The pure helpers (`parse_module`, `type_labels`, `type_totals`, `layer_totals`, `rank_table`) need no
matplotlib; only `write_report` draws.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ds_dynrank.errors import UserInputError
from ds_dynrank.rundir import RunDir

NO_LAYER = "-"
DPI = 100
TOP_LAYERS = 5


class RankTable(NamedTuple):
    """One event as a grid: `values[i][j]` is the rank of type `types[i]` in layer `layers[j]`, None where the
    model has no such module (so the heatmap can tell "rank 0" from "not adapted")."""

    types: list[str]
    layers: list[str]
    values: list[list[int | None]]


# ----------------------------------------------------------------------------------------------- pure helpers


def parse_module(name: str) -> tuple[int | None, str]:
    """(layer index, module type): the first all-digit path component is the layer, the last component the type."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    return layer, parts[-1]


def _suffix(name: str, depth: int) -> str:
    """The last `depth` components after the layer index (fewer if the name is shorter), joined by dots."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
    tail = parts[idx + 1 :] or parts[-1:]
    return ".".join(tail[-depth:])


def type_labels(names: Iterable[str]) -> dict[str, str]:
    """Row label per module: the last component, widened (`attn.c_proj`, `mlp.c_proj`) only for types that
    otherwise name two different modules of one layer, as GPT-2's two `c_proj` do. Same label across layers."""
    names = list(dict.fromkeys(names))
    labels = {n: parse_module(n)[1] for n in names}
    for depth in range(2, max((len(n.split(".")) for n in names), default=1) + 1):
        seen: dict[tuple[int | None, str], str] = {}
        clashing = set()
        for n in names:
            key = (parse_module(n)[0], labels[n])
            if seen.setdefault(key, n) != n:
                clashing.add(labels[n])
        if not clashing:
            break
        labels = {n: _suffix(n, depth) if lab in clashing else lab for n, lab in labels.items()}
    return labels


def layer_label(layer: int | None) -> str:
    """Column label: the index, or "-" for modules outside the numbered blocks (e.g. `lm_head`)."""
    return NO_LAYER if layer is None else str(layer)


def _ordered_layers(names: Iterable[str]) -> list[str]:
    """Numbered layers in numeric order, then "-": a heatmap reads bottom-to-top of the network left to right."""
    layers = {parse_module(n)[0] for n in names}
    numbered = sorted(x for x in layers if x is not None)
    return [str(x) for x in numbered] + ([NO_LAYER] if None in layers else [])


def type_totals(ranks: Mapping[str, int], labels: Mapping[str, str] | None = None) -> dict[str, int]:
    """Total live rank per module type, in the model's module order (q, k, v, o, gate, up, down for Llama)."""
    labels = labels or type_labels(ranks)
    totals: dict[str, int] = {}
    for name, rank in ranks.items():
        totals[labels[name]] = totals.get(labels[name], 0) + int(rank)
    return totals


def layer_totals(ranks: Mapping[str, int]) -> dict[str, int]:
    """Total live rank per layer label, layers in numeric order with "-" last."""
    totals = dict.fromkeys(_ordered_layers(ranks), 0)
    for name, rank in ranks.items():
        totals[layer_label(parse_module(name)[0])] += int(rank)
    return totals


def _grid(values: Mapping[str, Any], names: list[str], combine: Callable[[list[Any]], Any]) -> RankTable:
    """Types x layers grid of `values` over `names`; modules sharing a cell (unusual) are merged by `combine`."""
    labels = type_labels(names)
    types = list(dict.fromkeys(labels[n] for n in names))
    layers = _ordered_layers(names)
    cells: dict[tuple[str, str], list[Any]] = {}
    for n in names:
        if n in values:
            cells.setdefault((labels[n], layer_label(parse_module(n)[0])), []).append(values[n])
    grid = [[combine(cells[(t, lay)]) if (t, lay) in cells else None for lay in layers] for t in types]
    return RankTable(types, layers, grid)


def _all_names(history: list[dict]) -> list[str]:
    """Every module seen in any event, in first-seen order (the set is fixed in practice; this is robustness)."""
    return list(dict.fromkeys(n for event in history for n in event["ranks"]))


def rank_table(history: list[dict], event: int = -1) -> RankTable:
    """Rank grid of one event (default: the final allocation), modules sharing a cell summed."""
    return _grid(history[event]["ranks"], _all_names(history), sum)


def active_table(history: list[dict], event: int = -1) -> RankTable | None:
    """Same grid for the event's "active" flags (a cell is active if any of its modules is); None without them."""
    active = history[event].get("active")
    if active is None:
        return None
    return _grid({k: bool(v) for k, v in active.items()}, _all_names(history), any)


def type_activity(history: list[dict]) -> dict[str, tuple[int, int, float]] | None:
    """Per type: (events with any module active, events that recorded "active", % of module-events active).
    None when no event recorded "active" (every method but module allocation)."""
    events = [e for e in history if e.get("active") is not None]
    if not events:
        return None
    labels = type_labels(_all_names(history))
    counts: dict[str, list[int]] = {t: [0, 0, 0] for t in dict.fromkeys(labels.values())}
    for event in events:
        seen: dict[str, bool] = {}
        for name, on in event["active"].items():
            t = labels.get(name, parse_module(name)[1])
            c = counts.setdefault(t, [0, 0, 0])
            c[1] += bool(on)
            c[2] += 1
            seen[t] = seen.get(t, False) or bool(on)
        for t, any_on in seen.items():
            counts[t][0] += any_on
    return {t: (c[0], len(events), 100.0 * c[1] / c[2] if c[2] else 0.0) for t, c in counts.items()}


# ----------------------------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> Any:
    """Parsed JSON, or a one-line error naming the file and the position of the fault."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise UserInputError(f"{path}: cannot read ({err.strerror})") from None


def _check_event(path: Path, i: int, event: Any) -> None:
    """The keys the report relies on, checked once so drawing code can index freely."""
    if not isinstance(event, dict):
        raise UserInputError(f"{path}: event {i} is not an object")
    for key, kind in (("step", int), ("ranks", dict), ("budget", (int, float))):
        if not isinstance(event.get(key), kind):
            raise UserInputError(f"{path}: event {i} has no valid {key!r}")
    if not all(isinstance(r, int) and r >= 0 for r in event["ranks"].values()):
        raise UserInputError(f"{path}: event {i}: 'ranks' must map module names to ranks >= 0")
    if "active" in event and not isinstance(event["active"], dict):
        raise UserInputError(f"{path}: event {i}: 'active' must map module names to true/false")


def load_history(run_dir: Path) -> list[dict]:
    """The validated allocation history; every problem is a UserInputError naming the directory or file."""
    if not run_dir.is_dir():
        raise UserInputError(f"{run_dir}: no such run directory")
    path = RunDir(run_dir).history
    if not path.is_file():
        raise UserInputError(f"{path}: not found (is {run_dir} a run's output directory?)")
    history = _read_json(path)
    if not isinstance(history, list) or not history:
        raise UserInputError(f"{path}: expected a non-empty list of allocation events")
    for i, event in enumerate(history):
        _check_event(path, i, event)
    return history


def load_metrics(run_dir: Path) -> dict | None:
    """metrics.json if the run got that far (it is written at the end); None otherwise."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return None
    metrics = _read_json(path)
    if not isinstance(metrics, dict):
        raise UserInputError(f"{path}: expected a JSON object")
    return metrics


# ----------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas: no pyplot, so no global backend switch and nothing left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """PNG at a fixed low dpi with optimised compression: the report stays small enough to commit or attach."""
    fig.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})
    return path


def plot_heatmap(history: list[dict], path: Path) -> Path:
    """Final rank per type x layer; hatched cells are modules the last event left inactive (not trained)."""
    return _save(heatmap_figure(history), path)


def heatmap_image(history: list[dict]):
    """The heatmap as an RGB array [H, W, 3] (uint8), for TensorBoard's image tab."""
    import numpy as np

    fig = heatmap_figure(history)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def heatmap_figure(history: list[dict]):
    """The latest rank per type x layer as a Figure (see plot_heatmap)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    table = rank_table(history)
    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in table.values], float))
    n_types, n_layers = data.shape
    fig = _figure(min(14.0, 2.2 + 0.32 * n_layers), 1.3 + 0.32 * n_types)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="0.9")
    vmax = max(1.0, float(data.max()) if data.count() else 1.0)
    im = ax.imshow(data, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label("final rank")
    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()
    if n_layers <= 40:
        for i in range(n_types):
            for j in range(n_layers):
                if table.values[i][j] is not None:
                    color = "white" if table.values[i][j] < 0.55 * vmax else "black"
                    ax.text(j, i, str(table.values[i][j]), ha="center", va="center", fontsize=6, color=color)
    active = active_table(history)
    if active is not None:
        for i, row in enumerate(active.values):
            for j, on in enumerate(row):
                if on is False:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="////", edgecolor="red", lw=0))
    ax.set_xticks(range(n_layers), table.layers, fontsize=7)
    ax.set_yticks(range(n_types), table.types, fontsize=7)
    ax.set_xlabel("layer")
    hatched = "; red hatching: inactive" if active is not None else ""
    ax.set_title(f"Final rank per module (step {history[-1]['step']}{hatched})", fontsize=9)
    return fig


def _steps(history: list[dict], end_step: int | None) -> list[int]:
    """Event steps, plus the end of training so the last allocation's plateau is drawn to where it ended."""
    steps = [e["step"] for e in history]
    return steps + [end_step] if end_step is not None and end_step > steps[-1] else steps


def plot_rank_by_type(history: list[dict], path: Path, end_step: int | None = None) -> Path:
    """Total rank per type over training, drawn as steps: a rank holds until the next allocation event."""
    labels = type_labels(_all_names(history))
    totals = [type_totals(e["ranks"], labels) for e in history]
    steps = _steps(history, end_step)
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot()
    events = list(range(len(history)))  # markers on allocation events, not on the end-of-training point
    for t in dict.fromkeys(labels.values()):
        ys = [tot.get(t, 0) for tot in totals]
        ys += ys[-1:] * (len(steps) - len(ys))
        ax.plot(steps, ys, drawstyle="steps-post", marker="o", markersize=3, markevery=events, label=t)
    ax.set_xlabel("step")
    ax.set_ylabel("total rank")
    ax.set_title("Total rank per module type", fontsize=9)
    ax.legend(fontsize=7, ncols=2 if len(totals[0]) > 6 else 1, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_budget(history: list[dict], path: Path, end_step: int | None = None) -> Path:
    """Budget in use over training (line) and the slots each event moved (bars): is the allocation settling?"""
    from matplotlib.ticker import MaxNLocator

    steps = _steps(history, end_step)
    budget = [e["budget"] for e in history]
    budget += budget[-1:] * (len(steps) - len(budget))
    events = list(range(len(history)))
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    bars = ax.twinx()
    event_steps = [e["step"] for e in history]
    gaps = [b - a for a, b in zip(event_steps, event_steps[1:]) if b > a]
    bars.bar(
        event_steps,
        [e.get("slots_changed", 0) for e in history],
        width=0.6 * min(gaps, default=1),
        color="tab:orange",
        alpha=0.5,
        label="slots changed",
    )
    bars.set_ylabel("slots changed", color="tab:orange")
    bars.set_ylim(bottom=0)
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(steps, budget, drawstyle="steps-post", marker="o", markersize=3, markevery=events, color="tab:blue")
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xlabel("step")
    ax.set_ylabel(f"budget used ({history[-1].get('budget_unit', 'rank')})", color="tab:blue")
    ax.set_title("Budget in use and slots moved per event", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- summary


def _signed(x: float) -> str:
    """Changes always carry their sign, so "+0" reads as "unchanged" rather than as a missing value."""
    return f"{x:+,}"


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """GitHub markdown table lines; numeric columns right-aligned so totals line up."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def reading(initial: Mapping[str, int], final: Mapping[str, int]) -> str:
    """One computed sentence on where rank moved between module types."""
    change = {t: final.get(t, 0) - initial.get(t, 0) for t in dict.fromkeys([*initial, *final])}
    gained = sorted(((d, t) for t, d in change.items() if d > 0), key=lambda x: (-x[0], x[1]))
    lost = sorted((d, t) for t, d in change.items() if d < 0)
    if not gained and not lost:
        return "No module type changed its total rank."
    parts = []
    if gained:
        parts.append(
            f"{gained[0][1]} gained the most rank ({_signed(gained[0][0])}); gained: "
            + ", ".join(f"{t} ({_signed(d)})" for d, t in gained)
        )
    else:
        parts.append("No module type gained rank")
    parts.append("lost: " + ", ".join(f"{t} ({_signed(d)})" for d, t in lost) if lost else "none lost rank")
    return "; ".join(parts) + "."


def _run_lines(history: list[dict], metrics: dict | None) -> list[str]:
    """Header bullets: method and accuracy, events, total rank and budget from first to last event."""
    first, last = history[0], history[-1]
    unit = last.get("budget_unit", "rank")
    lines = []
    if metrics:
        acc = metrics.get("value")
        base = metrics.get("baseline_value")
        text = f"- Method: `{metrics.get('method', '?')}`"
        if isinstance(acc, (int, float)):
            text += f"; accuracy {acc:.4f}" + (f" (untrained {base:.4f})" if isinstance(base, (int, float)) else "")
        if "steps" in metrics:
            text += f" after {metrics['steps']} steps"
        lines.append(text)
        if "trainable_parameters" in metrics:
            before = metrics.get("trainable_parameters_initial", metrics["trainable_parameters"])
            lines.append(f"- Trainable parameters: {before:,} -> {metrics['trainable_parameters']:,}")
    moved = [e for e in history[1:] if e.get("slots_changed", 0)]
    lines.append(
        f"- Allocation events: {len(history)} (initial at step {first['step']} + {len(history) - 1} "
        f"re-allocations, {len(moved)} of which moved slots; "
        f"{sum(e.get('slots_changed', 0) for e in history):,} slots moved in all)"
    )
    r0, r1 = sum(first["ranks"].values()), sum(last["ranks"].values())
    lines.append(f"- Total rank: {r0:,} -> {r1:,} ({_signed(r1 - r0)})")
    lines.append(f"- Budget used: {first['budget']:,} -> {last['budget']:,} {unit} (step {last['step']})")
    return lines


def _type_section(history: list[dict]) -> list[str]:
    """Per-type table: initial, final, change and share of the final budget (of the final rank if counted in params)."""
    labels = type_labels(_all_names(history))
    initial, final = type_totals(history[0]["ranks"], labels), type_totals(history[-1]["ranks"], labels)
    total = sum(final.values())
    unit = history[-1].get("budget_unit", "rank")
    share = "share of budget (%)" if unit == "rank" else "share of final rank (%)"
    rows = []
    for t in dict.fromkeys(labels.values()):
        before, after = initial.get(t, 0), final.get(t, 0)
        rows.append(
            [f"`{t}`", before, after, _signed(after - before), f"{100.0 * after / total:.1f}" if total else "0.0"]
        )
    lines = ["## Rank by module type", "", *_md_table(["type", "initial", "final", "change", share], rows), ""]
    if unit != "rank":
        lines += ["The budget is counted in parameters; shares are of the total final rank.", ""]
    return [*lines, f"Reading: {reading(initial, final)}", ""]


def _layer_section(history: list[dict]) -> list[str]:
    """The layers that gained and lost most total rank between the first and last event."""
    initial, final = layer_totals(history[0]["ranks"]), layer_totals(history[-1]["ranks"])
    change = {lay: final.get(lay, 0) - initial.get(lay, 0) for lay in dict.fromkeys([*initial, *final])}
    gained = sorted((lay for lay, d in change.items() if d > 0), key=lambda lay: -change[lay])[:TOP_LAYERS]
    lost = sorted((lay for lay, d in change.items() if d < 0), key=lambda lay: change[lay])[:TOP_LAYERS]
    lines = ["## Layers", ""]
    for title, chosen in ((f"Top {TOP_LAYERS} gains", gained), (f"Top {TOP_LAYERS} losses", lost)):
        lines.append(f"**{title}**")
        lines.append("")
        rows = [[lay, initial.get(lay, 0), final.get(lay, 0), _signed(change[lay])] for lay in chosen]
        lines += [*_md_table(["layer", "initial", "final", "change"], rows), ""] if rows else ["none", ""]
    return lines


def _activity_section(history: list[dict]) -> list[str]:
    """How often each module type was trained, for the module-allocation method; empty for the others."""
    activity = type_activity(history)
    if activity is None:
        return []
    rows = [[f"`{t}`", f"{n_any}/{n}", f"{pct:.1f}"] for t, (n_any, n, pct) in activity.items()]
    header = ["type", "events with any module active", "module-events active (%)"]
    return [
        "## Active modules",
        "",
        *_md_table(header, rows),
        "",
        "Hatched cells in the heatmap were inactive at the last event.",
        "",
    ]


def summary_markdown(run_dir: Path, history: list[dict], metrics: dict | None, figures: list[Path]) -> str:
    """The whole summary.md; figures are linked by file name, so the report directory can be moved as one."""
    lines = [f"# Rank allocation report: `{run_dir.name or run_dir}`", "", *_run_lines(history, metrics), ""]
    lines += _type_section(history) + _layer_section(history) + _activity_section(history)
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" + "\n" for p in figures]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- entry point


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the figures and summary.md for one run's output directory; returns the summary's path."""
    run_dir = Path(run_dir)
    history = load_history(run_dir)
    metrics = load_metrics(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserInputError("the report draws with matplotlib: pip install matplotlib") from None
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).report
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"{out}: cannot create the report directory ({err.strerror})") from None
    end_step = metrics.get("steps") if metrics and isinstance(metrics.get("steps"), int) else None
    figures = [
        plot_heatmap(history, out / "rank_heatmap.png"),
        plot_rank_by_type(history, out / "rank_by_type.png", end_step),
        plot_budget(history, out / "budget.png", end_step),
    ]
    summary = out / "summary.md"
    summary.write_text(summary_markdown(run_dir, history, metrics, figures))
    return summary
