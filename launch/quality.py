"""Quality benchmark: every method against tuned LoRA, the static and scaling baselines and PEFT's own AdaLoRA, at
equal adapter parameters and equal optimizer steps, tuned on a validation split and reported over seeds. One
command, one run at a time; resumable (a run whose metrics.json exists is reused).

    python launch/quality.py --out runs/quality_sft                            # math and ShareGPT, r1 and r8
    python launch/quality.py --out runs/quality_sft --phase tune --tasks math --budget r2
    python launch/quality.py --out runs/quality_sft --phase test --choices benchmarks/results/quality_sft/tuning.json
    python launch/quality.py --out runs/quality_sft --summarise_only           # tabulate, start nothing

Tasks: the SFT default (`math`: school math, headline the held-out completion loss, exact match beside it) and
ShareGPT chat (`sharegpt`: held-out perplexity); `mr`, `wiki-uncertainty` (classification, accuracy) and dataset
paths still run. Budgets (`--budget r1,r2,r8`) are parameters, (in + out) x r summed over every linear layer at
uniform rank r; every arm is built to hold them (arms and their settings: launch/quality_arms.py).

`--phase tune` runs every arm's trials (one per learning rate in `--lrs`, the arm's own knobs paired with them) for
one seed on a validation split carved from the training rows (written under <out>/data/; the test split is never
read) and writes each arm's best trial by the task's headline to `--choices` (default <out>/tuning.json; commit it).
`--phase test` runs each arm's chosen trial on the real held-out split for every `--seeds`; `--phase all` does both.
Each run is the real main job (launch/train.py, or the peer's launcher) under the chosen launcher. Writes
`quality.json`, `quality.md` (launch/quality_tables.py), `quality_pareto.png` and `quality_ranks.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_arms as qa  # noqa: E402
import quality_tables as qt  # noqa: E402

from ds_dynrank import rundir  # noqa: E402  (names only: it loads no torch)

RUN_RECORD = "quality_run.json"  # next to metrics.json: the command, its wall time and processes


@dataclasses.dataclass
class Job:
    """One run: where it goes and what it starts from."""

    task: str
    budget: str
    phase: str
    arm: str
    trial: str
    seed: int
    dataset: str
    script: str
    cfg: dict
    config_name: str = "ds_config.json"  # beside the seeds; one per seed where the config follows the seed

    def path(self, out: Path) -> Path:
        return out / self.task / self.budget / self.phase / self.arm / self.trial / f"seed{self.seed}"


# ------------------------------------------------------------------------------------------------------- data


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_once(path: Path, write) -> Path:
    """Write through a partial sibling and rename: a killed run never leaves half a file to be reused."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        write(partial)
        os.replace(partial, path)
    return path


def prepare_data(out: Path, label: str, task: qa.Task) -> dict:
    """The task's two datasets: `validation`, the training rows alone (the job holds out its own fixed quarter of
    them, so tuning never reads the test split), and `test`, what the test phase reads (the dataset itself when it
    has its own test split or is classification, else the training and test rows written as a saved DatasetDict,
    so the validation rows and the test rows come from one split)."""
    from ds_dynrank.task.tables import EVAL_FRACTION, SPLIT_SEED, load_table, split_table

    table = load_table(task.dataset)
    train, test = split_table(table, eval_fraction=EVAL_FRACTION, split_seed=SPLIT_SEED)
    own_split = len(table) > 1
    where = out / "data" / label
    if task.kind == "classification":
        validation = _write_once(where / "validation.csv", lambda p: train.to_csv(str(p), index=False))
        test_set = task.dataset
    else:
        validation = _write_once(
            where / "validation.jsonl", lambda p: train.to_json(str(p), lines=True, force_ascii=False)
        )
        test_set = task.dataset
        if not own_split:
            import datasets

            split = where / "test-split"
            _write_once(split, lambda p: datasets.DatasetDict(train=train, test=test).save_to_disk(str(p)))
            test_set = str(split)
    return {
        "validation": str(validation),
        "validation_sha256": _sha256(validation),
        "train_rows": len(train),
        "test_rows": len(test),
        "test": test_set,
    }


def model_costs(model: str | None) -> dict[str, int]:
    """Every linear layer the job adapts under all-linear, with the cost of one rank: in + out features (from the
    model's meta-device skeleton: no weights load)."""
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.inject import select_targets
    from ds_dynrank.task.models import skeleton

    module = skeleton(model)
    chosen = set(select_targets(module, from_ds_config({"dynrank": {"target_modules": "all-linear"}})))
    return {n: int(sum(m.weight.shape)) for n, m in module.named_modules() if n in chosen}  # the model's order


# -------------------------------------------------------------------------------------------------------- runs


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of every finished child process tree: what a run really cost, whatever else shares
    the machine (its wall time is recorded beside it)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def command(args, job: Job, config_path: Path, out: Path, task: qa.Task, template: str | None) -> list[str]:
    from ds_dynrank.launch_env import free_port

    port = str(free_port())
    if args.launcher == "python":  # one process, no launcher
        launcher = [sys.executable]
    elif args.launcher == "torchrun":
        launcher = ["torchrun", "--nproc_per_node", str(args.nproc), "--master_addr", "127.0.0.1"]
        launcher += ["--master_port", port]
    else:
        launcher = ["deepspeed", "--num_gpus", str(args.nproc), "--master_port", port]
    cmd = [*launcher, str(REPO / "launch" / job.script), "--deepspeed", str(config_path), "--task", task.kind]
    cmd += ["--dataset", job.dataset, "--seed", str(job.seed), "--max_steps", str(args.max_steps)]
    cmd += ["--eval_interval", "0", "--eval_samples", str(args.eval_samples), "--output_dir", str(out)]
    if task.kind == "sft":  # a tuning choice reads the headline alone: its runs generate no answers
        generate = args.eval_generate if "exact_match" in task.also and job.phase == "test" else 0
        cmd += ["--eval_generate", str(generate)]
    if args.model:
        cmd += ["--model", args.model]
    if template:
        cmd += ["--prompt_template", template]
    return cmd + list(task.flags)


def run_one(args, job: Job, task: qa.Task, template: str | None) -> qt.Run:
    """One run: reused when its metrics.json exists, else trained now (unless --summarise_only)."""
    from ds_dynrank.rundir import RunDir, read_json, write_json

    out = job.path(Path(args.out))
    run = RunDir(out)
    result = qt.Run(job.task, job.budget, job.phase, job.arm, job.trial, job.seed)
    result.start_ranks = qa.start_ranks(job.arm, args.ctxs[job.budget], job.cfg)
    if not run.metrics.is_file():
        if args.summarise_only:
            return result
        config_path = out.parent / job.config_name
        write_json(config_path, job.cfg)
        cmd = command(args, job, config_path, out, task, template)
        print(f"[quality] start {job.phase} {job.task} {job.budget} {job.arm} {job.trial} seed {job.seed}", flush=True)
        log = out.parent / f"seed{job.seed}.log"
        start, used = time.time(), _children_cpu_seconds()
        with open(log, "w") as f:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
        if code != 0 or not run.metrics.is_file():
            print(f"[quality] FAILED ({code}): see {log}", flush=True)
            return result
        record = {
            "wall_seconds": round(time.time() - start, 2),
            "cpu_seconds": round(_children_cpu_seconds() - used, 2),
            "processes": args.nproc,
            "phase": job.phase,
            "dataset": job.dataset,
            "command": cmd,
        }
        write_json(out / RUN_RECORD, record)
        if args.reports and run.history.is_file():
            from ds_dynrank.tools.report import write_report

            write_report(out)
    else:
        args.reused += 1
    result.metrics = run.read_metrics()
    record = out / RUN_RECORD
    if record.is_file():
        done = read_json(record)
        result.cpu_seconds = done.get("cpu_seconds", done["wall_seconds"] * done["processes"])
    else:  # a run from before the record: its training loop's time only
        result.cpu_seconds = result.metrics.get("wall_seconds", 0) * result.metrics.get("world_size", 1)
    result.final_ranks = run.read_allocation() or {}
    return result


def seeded(job: Job) -> Job:
    """The job with its seed's config (the random control's decisions drawn from the seed), written beside the
    arm's other seeds under its own name."""
    if not qa.seed_dependent(job.arm, job.cfg):
        return job
    cfg = qa.for_seed(job.arm, job.cfg, job.seed)
    return dataclasses.replace(job, cfg=cfg, config_name=f"ds_config.seed{job.seed}.json")


def best(trials: list[tuple[float, dict, str]], lower_is_better: bool) -> tuple[float, dict, str]:
    """The best of (headline value, settings, label) trials; on a tie, the first."""
    sign = 1 if lower_is_better else -1
    return min(trials, key=lambda t: sign * t[0])


def tune(args, tasks, data, built) -> tuple[list[qt.Run], dict]:
    """Every arm's trials on the validation split at --tune_seed; each arm's best by the task's headline."""
    runs, choices = [], {}
    for label, task in tasks.items():
        for budget in args.ctxs:
            for arm in args.arms:
                trials = []
                for settings in built[budget][arm]:
                    script, cfg = qa.build_config(arm, args.ctxs[budget], settings)
                    job = seeded(Job(label, budget, "tune", arm, qa.trial_label(settings), args.tune_seed,
                                     data[label]["validation"], script, cfg))  # fmt: skip
                    run = run_one(args, job, task, data[label].get("template"))
                    runs.append(run)
                    if run.metrics and task.headline in run.metrics:
                        trials.append((run.metrics[task.headline], settings, run.trial))
                if trials:
                    value, settings, trial = best(trials, task.lower_is_better)
                    choices.setdefault(label, {}).setdefault(budget, {})[arm] = {
                        "trial": trial,
                        "settings": settings,
                        "metric": task.headline,
                        "value": value,
                        "trials": {t: v for v, _, t in trials},
                    }
    return runs, choices


def test(args, tasks, data, choices) -> list[qt.Run]:
    """Each arm's chosen trial on the held-out split, for every seed."""
    runs = []
    for label, task in tasks.items():
        for budget in args.ctxs:
            for arm in args.arms:
                choice = choices.get(label, {}).get(budget, {}).get(arm)
                if choice is None:
                    continue
                script, cfg = qa.build_config(arm, args.ctxs[budget], choice["settings"])
                for seed in args.seeds:
                    job = seeded(
                        Job(label, budget, "test", arm, choice["trial"], seed, data[label]["test"], script, cfg)
                    )
                    runs.append(run_one(args, job, task, data[label].get("template")))
    return runs


# -------------------------------------------------------------------------------------------------------- main

RESULT_FILES = (  # predictions.jsonl: the test runs' answers, so an exact-match number can be checked by question
    rundir.METRICS, rundir.PREDICTIONS, rundir.ALLOCATION, rundir.HISTORY, RUN_RECORD, "ds_config.json"
)  # fmt: skip
SUMMARY_FILES = ("quality.json", "quality.md", "quality_pareto.png", "quality_ranks.png")


def publish(out: Path, results: Path, choices: Path) -> int:
    """Copy what a reader of the tables needs, and nothing a run can rebuild (checkpoints, adapters, TensorBoard),
    from `out` to `results` in the same layout; returns the number of files copied."""
    import shutil

    copied = 0
    wanted = [out / name for name in SUMMARY_FILES] + [choices]
    for done in out.glob("*/*/*/*/*/seed*/metrics.json"):  # finished runs only: one in progress is left out
        wanted += [done.parent / name for name in RESULT_FILES] + list(done.parent.parent.glob("ds_config*.json"))
    for source in wanted:
        if source.is_file() and "checkpoints" not in source.parts:
            target = results / (source.name if source in (choices,) else source.relative_to(out))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied += 1
    return copied


def read_choices(path: Path) -> dict:
    return json.loads(path.read_text()).get("choices", {}) if path.is_file() else {}


def merge(earlier: dict, later: dict) -> dict:
    """choices[task][budget][arm]: `later` wins arm by arm, every other task, budget and arm kept."""
    merged = json.loads(json.dumps(earlier))
    for task, budgets in later.items():
        for budget, arms in budgets.items():
            merged.setdefault(task, {}).setdefault(budget, {}).update(arms)
    return merged


def write_choices(path: Path, args, data: dict, choices: dict) -> None:
    """Merged into the file's earlier choices (other tasks and budgets kept), with what they were chosen under."""
    from ds_dynrank.rundir import write_json

    previous = json.loads(path.read_text()) if path.is_file() else {}
    merged = merge(previous.get("choices", {}), choices)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    protocol = {
        "max_steps": args.max_steps,
        "lrs": args.lrs,
        "tune_seed": args.tune_seed,
        "eval_samples": args.eval_samples,
        "nproc": args.nproc,
        "commit": commit,
        "validation": {t: {k: v for k, v in d.items() if k != "template"} for t, d in data.items()},
    }
    write_json(path, {"protocol": {**previous.get("protocol", {}), **protocol}, "choices": merged})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "quality_sft"))
    p.add_argument("--tasks", default="math,sharegpt", help="math, sharegpt, mr, wiki-uncertainty, or a dataset path")
    p.add_argument("--budget", default="r1,r8", help="parameter budgets: r<rank>, comma-separated (r1, r2, r8)")
    p.add_argument("--arms", "--methods", dest="arms", default=",".join(qa.HEADLINE), help=f"of {', '.join(qa.ARMS)}")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="the learning-rate sweep (the job's default: 1e-3)")
    p.add_argument("--phase", choices=("tune", "test", "all"), default="all")
    p.add_argument("--seeds", default="0,1,2", help="test-phase seeds")
    p.add_argument("--tune_seed", type=int, default=0)
    p.add_argument("--choices", default=None, help="the tuning choices (default: <out>/tuning.json)")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--eval_samples", type=int, default=300, help="held-out examples per evaluation (0: all)")
    p.add_argument("--eval_generate", type=int, default=64, help="math: questions scored by exact match (test phase)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "python"),
        default="deepspeed",
        help="what starts each run (python: one process, --nproc 1)",
    )
    p.add_argument(
        "--reports", action=argparse.BooleanOptionalAction, default=True, help="each run's report/ (heatmaps)"
    )
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--summarise_only", action="store_true", help="tabulate the finished runs; start none")
    p.add_argument(
        "--results",
        default=None,
        help="also copy the tables, plots, choices and every finished run's small files (metrics, allocation, "
        "history, config, cost; no checkpoints or adapters) here, in the same layout: the directory to commit",
    )
    args = p.parse_args(argv)
    if args.launcher == "python":
        args.nproc = 1
    args.arms = qa.split_arms(args.arms)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.choices = Path(args.choices) if args.choices else Path(args.out) / "tuning.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.reused = 0
    try:  # every arm, budget and trial built and checked before anything is written or run
        tasks = dict(qa.task_for(t) for t in args.tasks.split(","))
        budgets = {b: qa.parse_budget(b) for b in args.budget.split(",")}
        for arm in args.arms:
            qa.parse_arm(arm)
        costs = model_costs(args.model)
        args.ctxs = {b: qa.Ctx(r, args.max_steps, costs) for b, r in budgets.items()}
        built = {b: {a: qa.trials(a, ctx, args.lrs) for a in args.arms} for b, ctx in args.ctxs.items()}
        for b, arms in built.items():
            for arm, settings in arms.items():
                for s in settings:
                    qa.build_config(arm, args.ctxs[b], s)
        choices = read_choices(args.choices)
        if args.phase == "test" and not args.summarise_only:
            missing = [f"{t}/{b}/{a}" for t in tasks for b in budgets for a in args.arms
                       if a not in choices.get(t, {}).get(b, {})]  # fmt: skip
            if missing:
                raise ValueError(f"--phase test: no tuning choice in {args.choices} for {', '.join(missing)}")
    except ValueError as err:  # UserInputError included: which arm, which field
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    data = {label: prepare_data(out, label, task) for label, task in tasks.items()}
    for label, task in tasks.items():
        if task.kind == "classification":
            from ds_dynrank.task.classification import task_template

            data[label]["template"] = task_template(task.dataset)
    runs = []
    if args.phase in ("tune", "all"):
        tuned, chosen = tune(args, tasks, data, built)
        runs += tuned
        if chosen and not args.summarise_only:
            write_choices(args.choices, args, data, chosen)
        # tabulating only: the file's choices (what the test runs were made with), else today's
        choices = merge(chosen, read_choices(args.choices)) if args.summarise_only else read_choices(args.choices)
    if args.phase in ("test", "all"):
        runs += test(args, tasks, data, choices)
    kinds = {a: qa.arm_kind(a) for a in args.arms}
    tables = qt.summarise(runs, tasks, args.ctxs, kinds)
    config = {k: v for k, v in vars(args).items() if k not in ("ctxs", "reused")}
    config["choices"] = str(args.choices)
    from ds_dynrank.rundir import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", {"config": config, "data": data, "tables": tables})
    (out / "quality.md").write_text(qt.markdown(config, tables))
    qt.plot_pareto(out / "quality_pareto.png", tables)
    qt.plot_ranks(out / "quality_ranks.png", tables)
    if args.results:
        published = publish(out, Path(args.results), args.choices)
        print(f"[quality] {published} files copied to {args.results}", flush=True)
    print(f"[quality] {args.reused} finished runs reused; written {out / 'quality.md'}", flush=True)
    failed = any(r.metrics is None for r in runs)
    return 1 if failed and not args.summarise_only else 0


if __name__ == "__main__":
    sys.exit(main())
