"""The quality benchmark's statistics, tables, targets and plots, from finished runs.

Per task and budget, per arm: mean ± std over seeds of every metric, the paired difference to tuned LoRA on the
same seeds with its standard error (a difference is claimed only beyond two standard errors), the adapter parameters
each arm really held, where it put its rank, the chosen trial and what it cost in CPU-hours.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from quality_arms import BASELINE, PERCENT, Ctx, Task, live_parameters, tolerance


@dataclass
class Run:
    """One run of the benchmark as the tables see it (metrics None: not finished)."""

    task: str
    budget: str
    phase: str  # tune or test
    arm: str
    trial: str
    seed: int
    metrics: dict | None = None
    cpu_seconds: float = 0.0
    final_ranks: dict[str, int] = field(default_factory=dict)
    start_ranks: dict[str, int] = field(default_factory=dict)


def paired(values: dict[int, float], base: dict[int, float]) -> tuple[float | None, float | None, int]:
    """(mean, standard error, pairs) of the per-seed differences values - base; SE None under two pairs."""
    seeds = sorted(set(values) & set(base))
    d = [values[s] - base[s] for s in seeds]
    if not d:
        return None, None, 0
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return statistics.fmean(d), se, len(d)


def claim(mean: float | None, se: float | None, lower_is_better: bool) -> str:
    """'better' / 'worse' when the difference lies beyond two standard errors, 'no' inside, 'n/a' without an SE."""
    if mean is None or se is None:
        return "n/a"
    if abs(mean) <= 2 * se:
        return "no"
    return "better" if (mean < 0) == lower_is_better else "worse"


def _lower(metric: str, task: Task) -> bool:
    return task.lower_is_better if metric == task.headline else metric not in PERCENT


def type_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def by_type(ranks: dict[str, int], costs: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
    """(mean rank, % of live adapter parameters) per module type, every adapted module counted (0 if left out)."""
    types = list(dict.fromkeys(type_of(n) for n in costs))
    total = live_parameters(ranks, costs) or 1
    mean = {t: statistics.fmean(ranks.get(n, 0) for n in costs if type_of(n) == t) for t in types}
    share = {t: 100 * sum(ranks.get(n, 0) * c for n, c in costs.items() if type_of(n) == t) / total for t in types}
    return mean, share


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def summarise(runs: list[Run], tasks: dict[str, Task], ctxs: dict[str, Ctx], kinds: dict[str, str]) -> dict:
    """tables[task][budget]: each arm's test results against tuned LoRA, its tuning trials, costs and targets."""
    tables: dict = {}
    for label, task in tasks.items():
        for budget, ctx in ctxs.items():
            mine = [r for r in runs if r.task == label and r.budget == budget]
            if not any(r.metrics for r in mine):
                continue
            tables.setdefault(label, {})[budget] = _table(mine, task, ctx, kinds)
    return tables


def _table(runs: list[Run], task: Task, ctx: Ctx, kinds: dict[str, str]) -> dict:
    metrics = [task.headline, *task.also]
    test = [r for r in runs if r.phase == "test" and r.metrics]
    values = {m: {} for m in metrics}  # metric -> arm -> seed -> value
    for r in test:
        for m in metrics:
            if m in r.metrics:
                values[m].setdefault(r.arm, {})[r.seed] = r.metrics[m]
    arms = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        done = [r for r in test if r.arm == arm]
        cpu = {p: sum(r.cpu_seconds for r in runs if r.arm == arm and r.phase == p) / 3600 for p in ("tune", "test")}
        row: dict = {"kind": kinds[arm], "cpu_hours": cpu, "seeds": len(done)}
        tune = {r.trial: r.metrics.get(task.headline) for r in runs if r.arm == arm and r.phase == "tune" and r.metrics}
        row["trials"] = tune
        if done:
            row["chosen"] = done[0].trial
            row["steps"] = min(r.metrics.get("steps", 0) for r in done)
            row["metrics"] = {}
            for m in metrics:
                mine = values[m].get(arm, {})
                if not mine:
                    continue
                mean, se, pairs = paired(mine, values[m].get(BASELINE, {})) if arm != BASELINE else (None, None, 0)
                row["metrics"][m] = {
                    "mean": statistics.fmean(mine.values()),
                    "std": statistics.stdev(mine.values()) if len(mine) > 1 else 0.0,
                    "by_seed": {str(s): v for s, v in sorted(mine.items())},
                    "delta": mean,
                    "se": se,
                    "pairs": pairs,
                    "claimed": claim(mean, se, _lower(m, task)) if arm != BASELINE else None,
                }
            finals = [live_parameters(r.final_ranks or r.start_ranks, ctx.costs) for r in done]
            final = statistics.fmean(finals)
            row["parameters"] = {
                "start": live_parameters(done[0].start_ranks, ctx.costs),
                "final": final,
                "final_by_seed": finals,
                "vs_budget": final / ctx.budget if ctx.budget else None,
                "matched": all(abs(f - ctx.budget) <= tolerance(ctx) for f in finals),
                "optimizer_held": _mean(r.metrics.get("trainable_parameters", 0) for r in done),
                "active_at_end": _mean(
                    r.metrics["trainable_parameters_active"] for r in done if "trainable_parameters_active" in r.metrics
                ),
            }
            shapes = [by_type(r.final_ranks or r.start_ranks, ctx.costs) for r in done]
            row["rank_by_type"] = {t: statistics.fmean(s[0][t] for s in shapes) for t in shapes[0][0]}
            row["params_share_by_type"] = {t: statistics.fmean(s[1][t] for s in shapes) for t in shapes[0][1]}
        arms[arm] = row
    table = {
        "headline": task.headline,
        "lower_is_better": task.lower_is_better,
        "budget_parameters": ctx.budget,
        "tolerance": tolerance(ctx),
        "modules": ctx.modules,
        "rank": ctx.r,
        "cpu_hours": {p: sum(a["cpu_hours"][p] for a in arms.values()) for p in ("tune", "test")},
        "arms": arms,
    }
    table["targets"] = targets(table, values[task.headline])
    return table


def _between(table: dict, values: dict, arm: str, other: str) -> str:
    mean, se, _ = paired(values.get(arm, {}), values.get(other, {}))
    return claim(mean, se, table["lower_is_better"])


def targets(table: dict, values: dict) -> list[tuple[str, str, str]]:
    """(target, met / missed / not run, why) for one task and budget, on the headline metric."""
    arms = {a: r for a, r in table["arms"].items() if r.get("metrics", {}).get(table["headline"])}
    head = table["headline"]
    out = []
    dynamic = {a: r for a, r in arms.items() if r["kind"] == "dynamic"}
    compared = {a: r["metrics"][head]["claimed"] for a, r in arms.items() if a != BASELINE}

    def status(ok: bool, evidence: bool) -> str:
        return "not run" if not evidence else ("met" if ok else "missed")

    have_se = {a: c for a, c in compared.items() if c != "n/a"}
    better = [a for a, c in have_se.items() if c == "better" and a in dynamic]
    out.append(
        (
            "a dynamic method better than tuned LoRA beyond 2 SE",
            status(bool(better), BASELINE in arms and any(a in dynamic for a in have_se)),
            ", ".join(better) or "none",
        )
    )
    worse = [a for a, c in have_se.items() if c == "worse"]
    out.append(
        ("no arm worse than tuned LoRA beyond 2 SE", status(not worse, bool(have_se)), ", ".join(worse) or "none")
    )
    sign = 1 if table["lower_is_better"] else -1
    best = min(dynamic, key=lambda a: sign * dynamic[a]["metrics"][head]["mean"]) if dynamic else None
    for static in ("random", "mlp-heavy", "rslora"):
        verdict = _between(table, values, best, static) if best and static in arms else "n/a"
        out.append(
            (
                f"the best dynamic method ({best or '-'}) better than {static} beyond 2 SE",
                status(verdict == "better", verdict != "n/a"),
                verdict,
            )
        )
    peers = [a for a, r in arms.items() if r["kind"] == "peer"]
    below = [
        a
        for a in dynamic
        for p in peers
        if sign * (dynamic[a]["metrics"][head]["mean"] - arms[p]["metrics"][head]["mean"]) > 0
    ]
    out.append(
        (
            f"every method of ours at least as good as {', '.join(peers) or 'the PEFT peer'} (means)",
            status(not below, bool(peers and dynamic)),
            ", ".join(sorted(set(below))) or "none below",
        )
    )
    for arm in (a for a in arms if a.split("+")[0].startswith("modalloc")):
        active, budget = arms[arm]["parameters"]["active_at_end"], table["budget_parameters"]
        fraction = active / budget if active and budget else None
        verdict = compared.get(arm, "n/a")
        out.append(
            (
                f"{arm} not worse than tuned LoRA beyond 2 SE, training at most 0.6 x its parameters",
                status(verdict in ("no", "better") and fraction is not None and fraction <= 0.6, verdict != "n/a"),
                f"{verdict}; trains {fraction:.2f} x" if fraction is not None else verdict,
            )
        )
    unmatched = [
        a
        for a, r in table["arms"].items()
        if r["kind"] != "peer" and r.get("parameters") and not r["parameters"]["matched"]
    ]
    out.append(
        (
            "every arm's live adapter parameters at the budget (within the tolerance; the peers' ranks are PEFT's)",
            status(not unmatched, bool(arms)),
            ", ".join(unmatched) or "all within",
        )
    )
    return out


def protocol(config: dict, tables: dict) -> list[tuple[str, str, str]]:
    """The design's own requirements: steps, seeds, the learning-rate sweep."""
    rows = [r for t in tables.values() for b in t.values() for r in b["arms"].values() if r.get("seeds")]
    steps = min((r["steps"] for r in rows), default=0)
    seeds = min((r["seeds"] for r in rows), default=0)
    tuned = [r for t in tables.values() for b in t.values() for r in b["arms"].values() if r["trials"]]
    trials = min((len(r["trials"]) for r in tuned), default=0)

    def status(ok: bool, evidence: bool) -> str:
        return "not run" if not evidence else ("met" if ok else "missed")

    return [
        ("at least 300 optimizer steps per run", status(steps >= 300, bool(rows)), f"fewest: {steps}"),
        ("at least 3 seeds per arm", status(seeds >= 3, bool(rows)), f"fewest: {seeds}"),
        (
            "learning rate swept over at least 3 values on the validation split, as many trials for every arm",
            status(len(config["lrs"]) >= 3 and trials >= 3, bool(tuned)),
            f"{len(config['lrs'])} learning rates; fewest finished trials: {trials}",
        ),
    ]


# -------------------------------------------------------------------------------------------------- markdown


def _fmt(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    if metric in PERCENT:
        value = 100 * value
    return f"{value:+.3g}" if signed else f"{value:.4g}"


def _cell(metric: str, stats: dict | None) -> tuple[str, str, str]:
    if not stats:
        return "–", "–", "–"
    mean_std = f"{_fmt(metric, stats['mean'])} ± {_fmt(metric, stats['std'])}"
    if stats["delta"] is None:
        return mean_std, "–", "–"
    se = "n/a" if stats["se"] is None else _fmt(metric, stats["se"])
    return mean_std, f"{_fmt(metric, stats['delta'], signed=True)} ± {se}", stats["claimed"]


def _name(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT else metric


def markdown(config: dict, tables: dict) -> str:
    lines = [
        "# Quality benchmark",
        "",
        f"{config['max_steps']} optimizer steps a run, {config['nproc']} processes; test seeds {config['seeds']}; "
        f"tuning on the validation split (carved from the training data, seed {config['tune_seed']}) over learning "
        f"rates {config['lrs']}, as many trials for every arm. Δ: the paired difference to tuned LoRA on the same "
        "seeds ± its standard error; `beyond 2 SE` says whether it is claimed (better / worse), `no` if it is not, "
        "`n/a` under two paired seeds. Parameters: live adapter parameters, (in + out) x rank summed over the "
        "adapted modules (gates left out).",
        "",
        "Protocol:",
        "",
        *(f"- {t}: **{s}** ({why})" for t, s, why in protocol(config, tables)),
        "",
    ]
    for task, budgets in tables.items():
        for budget, t in budgets.items():
            lines += _section(task, budget, t)
    return "\n".join(lines)


def _section(task: str, budget: str, t: dict) -> list[str]:
    head = t["headline"]
    also = sorted({m for r in t["arms"].values() for m in r.get("metrics", {}) if m != head})
    cpu = t["cpu_hours"]
    lines = [
        f"## {task}, budget {budget}",
        "",
        f"Budget: the parameters of uniform r={t['rank']} on all {t['modules']} linear layers, "
        f"{t['budget_parameters']:,} (tolerance ± {t['tolerance']:,}). Headline: `{head}` "
        f"({'lower' if t['lower_is_better'] else 'higher'} is better). CPU-hours: tuning {cpu['tune']:.2f}, test "
        f"{cpu['test']:.2f}, together {cpu['tune'] + cpu['test']:.2f}.",
        "",
    ]
    header = [f"{_name(head)} mean ± std", "Δ to LoRA ± SE", "beyond 2 SE"]
    for m in also:
        header += [f"{_name(m)} mean ± std", f"{m}: Δ ± SE (beyond 2 SE)"]
    header += ["seeds", "parameters start → end", "end / budget", "chosen", "CPU-h tune + test"]
    lines += ["| arm | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    tested = {a: r for a, r in t["arms"].items() if r.get("metrics")}
    for arm, r in tested.items():
        cells = [*_cell(head, r["metrics"].get(head))]
        for m in also:
            mean_std, delta, claimed = _cell(m, r["metrics"].get(m))
            cells += [mean_std, delta if delta == "–" else f"{delta} ({claimed})"]
        p = r["parameters"]
        cells += [
            str(r["seeds"]),
            f"{p['start']:,} → {p['final']:,.0f}",
            f"{p['vs_budget']:.4f}" + ("" if p["matched"] else " (off)"),
            r["chosen"],
            f"{r['cpu_hours']['tune']:.2f} + {r['cpu_hours']['test']:.2f}",
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if not tested:
        lines.append("| (no test run finished) |" + " |" * len(header))
    tuned = {a: r for a, r in t["arms"].items() if r["trials"]}
    if tuned:
        lines += ["", f"Tuning trials (`{head}` on the validation split; chosen in bold):", ""]
        lower = t["lower_is_better"]
        for arm, r in tuned.items():
            trials = {k: v for k, v in r["trials"].items() if v is not None}
            best = (min if lower else max)(trials, key=trials.get) if trials else None
            cells = [f"**{k}: {_fmt(head, v)}**" if k == best else f"{k}: {_fmt(head, v)}" for k, v in trials.items()]
            lines.append(f"- {arm}: " + "; ".join(cells))
    ranked = {a: r for a, r in tested.items() if r.get("rank_by_type")}
    if ranked:
        types = list(next(iter(ranked.values()))["rank_by_type"])
        lines += ["", "Where the rank went: mean final rank per module type (% of the live parameters):", ""]
        lines += ["| arm | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for arm, r in ranked.items():
            cells = [f"{r['rank_by_type'][ty]:.2f} ({r['params_share_by_type'][ty]:.0f}%)" for ty in types]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", "", *(f"- {name}: **{s}** ({why})" for name, s, why in t["targets"]), ""]
    return lines


# ----------------------------------------------------------------------------------------------------- plots


def plot_pareto(path: Path, tables: dict) -> None:
    """Headline metric against live adapter parameters per arm, every budget of a task on one panel."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(8, 4.2 * max(1, len(tables))), dpi=100)
    for i, (task, budgets) in enumerate(tables.items()):
        ax = fig.add_subplot(len(tables), 1, i + 1)
        head = next(iter(budgets.values()))["headline"]
        points: dict[str, list[tuple[float, float, float]]] = {}
        for t in budgets.values():
            for arm, r in t["arms"].items():
                stats = r.get("metrics", {}).get(head)
                if stats:
                    points.setdefault(arm, []).append((r["parameters"]["final"], stats["mean"], stats["std"]))
        for arm, pts in points.items():
            pts.sort()
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm, linewidth=1)
        for t in budgets.values():  # where equal parameters lies
            ax.axvline(t["budget_parameters"], color="grey", linestyle=":", linewidth=1)
        xs = [x for pts in points.values() for x, _, _ in pts]
        if xs and max(xs) > 3 * min(xs):  # log only where the budgets differ: one budget's arms sit within a few %
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.set_xlabel("live adapter parameters at the end")
        lower = next(iter(budgets.values()))["lower_is_better"]
        ax.set_ylabel(f"{head} ({'lower' if lower else 'higher'} is better)")
        ax.set_title(f"{task}: quality against trainable parameters")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def plot_ranks(path: Path, tables: dict) -> None:
    """Mean final rank per module type, one group of bars per type and one bar per arm, a panel per task and
    budget."""
    from matplotlib.figure import Figure

    panels = [(f"{task}, {budget}", t) for task, budgets in tables.items() for budget, t in budgets.items()]
    fig = Figure(figsize=(9, 3.4 * max(1, len(panels))), dpi=100)
    for i, (title, t) in enumerate(panels):
        ax = fig.add_subplot(max(1, len(panels)), 1, i + 1)
        ranked = {a: r["rank_by_type"] for a, r in t["arms"].items() if r.get("rank_by_type")}
        if ranked:
            types = list(next(iter(ranked.values())))
            width = 0.8 / len(ranked)
            for k, (arm, ranks) in enumerate(ranked.items()):
                ax.bar([j + k * width for j in range(len(types))], [ranks[ty] for ty in types], width, label=arm)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types)
            ax.legend(fontsize=7, ncol=3)
        ax.set_ylabel("mean final rank")
        ax.set_title(f"{title}: where each arm put its rank")
    fig.tight_layout()
    fig.savefig(path)
