"""Quality benchmark: every method against vanilla LoRA and PEFT's own AdaLoRA, at equal rank budget and equal
optimizer steps, over several seeds and tasks. One command; resumable (a run whose metrics.json exists is kept).

    python launch/quality.py --out runs/quality                        # 2 tasks x 3 seeds x every method
    python launch/quality.py --out runs/quality --methods lora,l1ra --seeds 0 --tasks mr

Each run is the real main job (launch/train.py, or launch/train_peft_adalora.py for the peer) started with the
DeepSpeed launcher. Budgets: LoRA, L1RA, ALoRA and module allocation hold r=8 on every linear layer; AdaLoRA
(ours and PEFT's) starts at r=12 and ends at target_r=8. Event schedules are scaled to --max_steps. Writes
`quality.json`, `quality.md` (mean ± std per task and method, rank distribution per module type, the targets),
`quality.png`, and each run's `report/`.

A method may carry overrides of its own config section, `+`-separated, e.g. `l1ra+l1_lambda=0.05`; with
`--validation` every run trains and scores inside the task's training split (a fixed quarter of it held out), so
settings are chosen without reading the test sentences:

    python launch/quality.py --out runs/l1ra_sweep --validation --tasks mr --seeds 0 \
        --methods lora,l1ra+l1_lambda=0.5,l1ra+l1_lambda=0.05,l1ra+l1_lambda=0.005
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TASKS = {"mr": "mr-polarity", "wiki-uncertainty": "wiki-uncertainty"}
from ds_dynrank.launch_env import free_port  # noqa: E402
from ds_dynrank.methods.modalloc.strategies import STRATEGIES  # noqa: E402


class Arm(NamedTuple):
    """One arm of the benchmark: its launcher, the shipped DeepSpeed config it starts from, and the `"dynrank"`
    settings it runs at, as a function of the run length (None: a peer with no "dynrank" section)."""

    script: str
    config: str
    settings: Callable[[int], dict] | None


def _every(n: int, parts: int) -> int:
    return max(1, n // parts)


SHARED = {"target_modules": "all-linear", "r": 8, "lora_alpha": 16}  # the rank budget every arm holds
ARMS = {
    "lora": Arm("train.py", "zero2.json", lambda n: SHARED),
    "l1ra": Arm("train.py", "zero2_l1ra.json", lambda n: SHARED),
    # the paper's round, on every module: scoring cost grows with the ranks scored
    "alora": Arm(
        "train.py",
        "zero2_alora.json",
        lambda n: {
            **SHARED,
            "capacity": 16,
            "schedule": {"start": _every(n, 4), "interval": _every(n, 4)},
            "alora": {"rounds": 2, "val_samples": 2},
        },
    ),
    **{
        f"modalloc-{s}": Arm(
            "train.py",
            "zero2_modalloc.json",
            lambda n, s=s: {
                **SHARED,
                "schedule": {"kind": "periodic", "interval": _every(n, 6)},
                "modalloc": {"score": "activation", "strategy": s},
            },
        )
        for s in STRATEGIES
    },
    "adalora": Arm("train.py", "zero2_adalora.json", lambda n: {**SHARED, "r": 12}),  # 12 -> 8, as PEFT's peer
    # its launcher builds AdaLoraConfig from the config's own "peft_adalora" section, at the same budget
    "peft-adalora": Arm("train_peft_adalora.py", "zero0_peft_adalora.json", None),
}
METHODS = tuple(ARMS)
BASELINE, PEER = "lora", "peft-adalora"  # what every arm is paired with, and the outside peer


def parse_method(spec: str) -> tuple[str, dict]:
    """'l1ra+l1_lambda=0.05' -> ('l1ra', {'l1_lambda': 0.05}): an arm and overrides of its method's own section."""
    from ds_dynrank.tools.overrides import split_overrides

    base, overrides = split_overrides(spec, "--methods")
    if base not in METHODS:
        raise ValueError(f"--methods: unknown {base!r} (known: {', '.join(METHODS)})")
    return base, overrides


def method_config(spec: str, max_steps: int) -> tuple[str, dict]:
    """(script, DeepSpeed config) of one arm at the shared budget, its events scaled to the run, overrides applied
    last and the result validated as the job would validate it."""
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.methods.registry import spec as method_spec
    from ds_dynrank.tools.overrides import apply_overrides

    base, overrides = parse_method(spec)
    arm = ARMS[base]
    cfg = json.loads((REPO / "ds_configs" / arm.config).read_text())
    if arm.settings is not None:
        section = cfg["dynrank"]
        for key, value in arm.settings(max_steps).items():
            section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    method = cfg.get("dynrank", {}).get("method")
    if overrides:
        if method is None or method_spec(method).section is None:
            raise ValueError(f"--methods: {spec!r}: {base} has no method section to override")
        cfg["dynrank"] = apply_overrides(cfg["dynrank"], method, overrides)
        from_ds_config(cfg)  # a bad key or value is a UserInputError naming the field, before any run starts
    return arm.script, cfg


def label(task: str) -> str:
    """A task's directory and table name: its short name, or a dataset path's file stem."""
    return task if task in TASKS else Path(task).stem


def validation_task(out: Path, task: str) -> tuple[str, str]:
    """(CSV path, prompt) of the task's training split alone: a run on it holds out a fixed quarter of the training
    sentences and never reads the test split. The prompt stays the original task's."""
    from ds_dynrank.task.classification import EVAL_FRACTION, SPLIT_SEED, load_table, split_table, task_template

    dataset = TASKS.get(task, task)
    path = out / "validation" / f"{label(task)}-validation.csv"
    if not path.is_file():
        train, _ = split_table(load_table(dataset), eval_fraction=EVAL_FRACTION, split_seed=SPLIT_SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        train.to_csv(str(partial), index=False)
        os.replace(partial, path)  # a killed run leaves no half-written table to be reused
    return str(path), task_template(dataset)


def run_one(args, task: str, method: str, built: tuple[str, dict], seed: int) -> dict | None:
    """One run's metrics: reused when its metrics.json exists, else trained now with `built` (script, config)."""
    from ds_dynrank.rundir import RunDir

    run = RunDir(Path(args.out) / label(task) / method / f"seed{seed}")
    out = run.path
    if run.metrics.is_file():
        return run.read_metrics()
    if args.summarise_only:
        return None
    script, cfg = built
    config_path = Path(args.out) / "configs" / f"{method}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(cfg, indent=2))
    port = str(free_port())
    if args.launcher == "torchrun":
        launcher = [
            "torchrun",
            "--nproc_per_node",
            str(args.nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    else:
        launcher = ["deepspeed", "--num_gpus", str(args.nproc), "--master_port", port]
    cmd = [
        *launcher,
        str(REPO / "launch" / script),
        "--deepspeed",
        str(config_path),
        "--task",
        "classification",  # the sentence tasks (the SFT benchmark is issue 23's)
        "--dataset",
        TASKS.get(task, task),
        "--seed",
        str(seed),
        "--max_steps",
        str(args.max_steps),
        "--eval_interval",
        "0",
        "--eval_samples",
        str(args.eval_samples),
        "--output_dir",
        str(out),
    ]
    if args.model:
        cmd += ["--model", args.model]
    if task in args.templates:
        cmd += ["--prompt_template", args.templates[task]]
    print(f"[quality] {task} {method} seed {seed}", flush=True)
    log = out.parent / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
    if code != 0:
        print(f"[quality] FAILED ({code}): see {log}", flush=True)
        return None
    if run.history.is_file():
        from ds_dynrank.tools.report import write_report

        write_report(out)
    return run.read_metrics()


def type_ranks(run_dir: Path) -> dict[str, float]:
    """Mean final rank per module type (q_proj, ...; the report's labels), from allocation.json."""
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.tools.report import type_labels, type_totals

    ranks = RunDir(run_dir).read_allocation()
    if not ranks:
        return {}
    labels = type_labels(ranks)
    counts = {t: list(labels.values()).count(t) for t in set(labels.values())}
    return {t: total / counts[t] for t, total in type_totals(ranks, labels).items()}


def type_active_share(run_dir: Path) -> dict[str, float]:
    """% of module-events each module type trained (module allocation), from allocation_history.json."""
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.tools.report import type_activity

    history = RunDir(run_dir).read_history()
    shares = type_activity(history) if history else None
    return {t: share for t, (_, _, share) in (shares or {}).items()}


def summarise(args, results: dict) -> dict:
    """mean ± std per task and method, and the targets against LoRA and PEFT's AdaLoRA."""
    table = {}
    for task, by_method in results.items():
        table[label(task)] = {}
        lora = {seed: r for seed, r in by_method.get(BASELINE, {}).items() if r}
        for method, runs in by_method.items():
            done = {seed: r for seed, r in runs.items() if r}  # failed runs are None
            if not done:
                continue
            values = [100 * r["value"] for r in done.values()]
            dirs = [Path(args.out) / label(task) / method / f"seed{s}" for s in done]
            per_type = [type_ranks(d) for d in dirs]
            types = sorted({t for p in per_type for t in p})
            active = [type_active_share(d) for d in dirs]
            active_types = sorted({t for a in active for t in a})
            first = next(iter(done.values()))
            paired = [100 * (r["value"] - lora[seed]["value"]) for seed, r in done.items() if seed in lora]
            table[label(task)][method] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": len(values),
                "by_seed": {str(seed): 100 * r["value"] for seed, r in done.items()},
                "paired_to_lora": statistics.fmean(paired) if paired and method != BASELINE else None,
                "trainable_parameters": first["trainable_parameters"],
                "active_parameters": statistics.fmean(
                    r.get("trainable_parameters_active", r["trainable_parameters"]) for r in done.values()
                ),
                "final_budget": first.get("final_budget"),
                "rank_by_type": {t: statistics.fmean(p.get(t, 0) for p in per_type) for t in types},
                "active_share_by_type": {t: statistics.fmean(a.get(t, 0) for a in active) for t in active_types},
            }
    return {task: rows for task, rows in table.items() if rows}  # a task with no finished run is left out


def targets(task_table: dict) -> list[str]:
    if BASELINE not in task_table:
        return ["no LoRA baseline in this task"]
    lora = task_table[BASELINE]["mean"]
    dynamic = {m: v["mean"] for m, v in task_table.items() if m not in (BASELINE, PEER)}
    lines = []
    if dynamic:
        best = max(dynamic, key=dynamic.get)
        ok = dynamic[best] >= lora + 0.5
        lines.append(
            f"best dynamic method {best} {dynamic[best]:.1f} vs LoRA {lora:.1f} + 0.5: {'met' if ok else 'missed'}"
        )
        below = [m for m, v in dynamic.items() if v < lora - 0.3]
        lines.append(f"no method below LoRA - 0.3: {'met' if not below else 'missed by ' + ', '.join(below)}")
    if PEER in task_table:
        peer = task_table[PEER]["mean"]
        worse = [m for m, v in dynamic.items() if v < peer]
        lines.append(
            f"every method >= PEFT AdaLoRA ({peer:.1f}): {'met' if not worse else 'missed by ' + ', '.join(worse)}"
        )
    return lines


def write_outputs(args, table: dict) -> None:
    from ds_dynrank.rundir import write_json

    out = Path(args.out)
    write_json(out / "quality.json", {"config": vars(args), "table": table})
    setup = f"Steps {args.max_steps}, seeds {args.seeds}, {args.nproc} processes."
    lines = ["# Quality benchmark", "", setup, ""]
    for task, rows in table.items():
        header = (
            "| method | accuracy (%) mean ± std | by seed | paired Δ to LoRA | adapter params allocated | "
            "params training at the end | final rank budget |"
        )
        lines += [f"## {task}", "", header, "|---|---|---|---|---|---|---|"]
        for method, r in rows.items():
            paired = "–" if r["paired_to_lora"] is None else f"{r['paired_to_lora']:+.2f}"
            by_seed = ", ".join(f"{v:.1f}" for v in r["by_seed"].values())
            cells = [
                f"{r['mean']:.2f} ± {r['std']:.2f}",
                by_seed,
                paired,
                f"{r['trainable_parameters']:,}",
                f"{r['active_parameters']:,.0f}",
                r["final_budget"],
            ]
            lines.append(f"| {method} | " + " | ".join(str(c) for c in cells) + " |")
        types = sorted({t for r in rows.values() for t in r["rank_by_type"]})
        if types:
            lines += [
                "",
                "Mean final rank per module type:",
                "",
                "| method | " + " | ".join(types) + " |",
                "|---|" + "---|" * len(types),
            ]
            for method, r in rows.items():
                lines.append(f"| {method} | " + " | ".join(f"{r['rank_by_type'].get(t, 0):.1f}" for t in types) + " |")
        active = {m: r["active_share_by_type"] for m, r in rows.items() if r.get("active_share_by_type")}
        if active:
            types = sorted({t for a in active.values() for t in a})
            lines += [
                "",
                "Module allocation: % of module-events each type trained:",
                "",
                "| method | " + " | ".join(types) + " |",
                "|---|" + "---|" * len(types),
            ]
            for method, a in active.items():
                lines.append(f"| {method} | " + " | ".join(f"{a.get(t, 0):.0f}" for t in types) + " |")
        lines += ["", "Targets:", "", *(f"- {t}" for t in targets(rows)), ""]
    (out / "quality.md").write_text("\n".join(lines))
    plot(out / "quality.png", table)


def plot(path: Path, table: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2 * max(1, len(table))), dpi=100)
    for i, (task, rows) in enumerate(table.items()):
        ax = fig.add_subplot(len(table), 1, i + 1)
        names = list(rows)
        ax.bar(names, [rows[m]["mean"] for m in names], yerr=[rows[m]["std"] for m in names], capsize=3)
        low = min(rows[m]["mean"] - rows[m]["std"] for m in names)
        ax.set_ylim(max(0, low - 3), 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--tasks", default=",".join(TASKS), help="mr, wiki-uncertainty, or a dataset path")
    p.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--eval_samples", type=int, default=0, help="held-out examples (0: the whole split)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed", help="what starts each run")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--summarise_only", action="store_true", help="tabulate the finished runs; start none")
    p.add_argument("--validation", action="store_true", help="train and score inside each task's training split")
    args = p.parse_args()
    methods = args.methods.split(",")
    try:  # every method built and checked before the first run starts
        built = {spec: method_config(spec, args.max_steps) for spec in methods}
    except ValueError as err:  # UserInputError included: which method, which field
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks, args.templates = args.tasks.split(","), {}
    if args.validation:
        args.templates = dict(validation_task(Path(args.out), task) for task in tasks)
        tasks = list(args.templates)
    results = {task: {m: {s: run_one(args, task, m, built[m], s) for s in seeds} for m in methods} for task in tasks}
    write_outputs(args, summarise(args, results))
    print(f"[quality] written {Path(args.out) / 'quality.md'}")
    failed = any(r is None for t in results.values() for m in t.values() for r in m.values())
    return 1 if failed and not args.summarise_only else 0


if __name__ == "__main__":
    sys.exit(main())
