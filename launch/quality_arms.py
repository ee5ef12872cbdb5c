"""The quality benchmark's data: its tasks, its parameter budgets and its arms, and how one arm at one budget and
one trial becomes the DeepSpeed config a run starts from. Pure (pydantic only, no torch): the unit tests build every
arm's config without a model, from the adapted modules' shapes.

An arm is one entry of ARMS: its launcher, the shipped config it starts from, its `"dynrank"` (or peer) settings as
a function of the budget and run length, and the knobs tuned besides the learning rate. A new method or peer is one
more entry.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """What one task trains on and how it is judged: one headline metric (the tuning choice and the claims), the
    others reported beside it."""

    dataset: str
    kind: str  # the job's --task: sft or classification
    headline: str
    lower_is_better: bool
    also: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # job flags of this task (besides --dataset)


TASKS = {
    # completion loss on the answer tokens: exact match on 64 questions has a standard error of about 4.5 points
    "math": Task("school-math", "sft", "eval_loss", True, ("exact_match", "token_accuracy")),
    # multi-turn chats up to 2,000 characters: 256 tokens would drop most of them
    "sharegpt": Task("sharegpt", "sft", "perplexity", True, ("eval_loss", "token_accuracy"), ("--max_length", "512")),
    "mr": Task("mr-polarity", "classification", "accuracy", False),
    "wiki-uncertainty": Task("wiki-uncertainty", "classification", "accuracy", False),
}
HIGHER_IS_BETTER = {"accuracy", "exact_match", "token_accuracy"}
PERCENT = HIGHER_IS_BETTER  # shown in %


def task_for(spec: str) -> tuple[str, Task]:
    """(label, Task) of a --tasks entry: a known name, or `sft:PATH` / `classification:PATH` / a bare path (a .csv is
    classification, anything else SFT), labelled by its file stem."""
    if spec in TASKS:
        return spec, TASKS[spec]
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("sft", "classification"):
        kind, path = ("classification" if spec.endswith(".csv") else "sft"), spec
    headline = "eval_loss" if kind == "sft" else "accuracy"
    also = ("exact_match", "token_accuracy") if kind == "sft" else ()
    return Path(path).stem, Task(path, kind, headline, headline not in HIGHER_IS_BETTER, also)


# ---------------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Ctx:
    """What an arm's settings depend on: the budget's uniform rank, the run length, and the adapted modules' cost of
    one rank ((in + out) features, in the model's module order)."""

    r: int
    steps: int
    costs: dict[str, int] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        """The parameter budget every arm holds: uniform rank r on every linear layer."""
        return self.r * sum(self.costs.values())

    @property
    def modules(self) -> int:
        return len(self.costs)

    def part(self, fraction: float, at_least: int = 1) -> int:
        return max(at_least, round(fraction * self.steps))


def parse_budget(spec: str) -> int:
    """'r8' -> 8: the budget named by the uniform rank whose parameters every arm gets."""
    if not re.fullmatch(r"r[1-9][0-9]*", spec):
        raise ValueError(f"--budget: {spec!r} is not r<rank> (r1, r2, r8)")
    return int(spec[1:])


def live_parameters(ranks: dict[str, int], costs: dict[str, int]) -> int:
    """Adapter parameters of live ranks, (in + out) x rank summed (gates, one value a rank, left out)."""
    return sum(int(rank) * costs.get(name, 0) for name, rank in ranks.items())


def tolerance(ctx: Ctx) -> int:
    """How far an arm's parameters may sit from the budget and still count as equal: one rank of the widest module
    (what integer ranks under a params budget can miss by), or 1% of the budget, whichever is larger."""
    return max(max(ctx.costs.values(), default=0), math.ceil(0.01 * ctx.budget))


def initial_ranks(section: dict, costs: dict[str, int]) -> dict[str, int]:
    """The rank each adapted module starts at under a `"dynrank"` section (r, rank_pattern, exclude_modules),
    by the job's own matching rule."""
    excluded = section.get("exclude_modules", [])
    pattern, r = section.get("rank_pattern", {}), section.get("r", 8)
    return {n: _pattern_value(n, pattern, r) for n in costs if not any(n == k or n.endswith("." + k) for k in excluded)}


def _pattern_value(name: str, pattern: dict, default: int) -> int:
    """PEFT's rule, as ds_dynrank/inject.py applies it (restated here without torch): the first key that matches
    the end of the name wins."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3"}


def is_mlp(name: str) -> bool:
    return ".mlp." in f".{name}." or name.rsplit(".", 1)[-1] in MLP_LEAVES


def mlp_heavy(ctx: Ctx) -> dict:
    """A static MLP-heavy pattern at the budget's parameters: attention at r // 2 (left out at r = 1), the MLP
    projections sharing the rest in whole ranks as evenly as they fit. Lands within one MLP rank below the budget.
    Every module keeps LoRA's alpha / r = 2."""
    attention = [n for n in ctx.costs if not is_mlp(n)]
    mlp = [n for n in ctx.costs if is_mlp(n)]
    if not mlp:
        raise ValueError("mlp-heavy: the model has no MLP projections among its linear layers")
    r_att = ctx.r // 2
    room = ctx.budget - r_att * sum(ctx.costs[n] for n in attention)
    base = room // sum(ctx.costs[n] for n in mlp)
    ranks = dict.fromkeys(mlp, base)
    room -= base * sum(ctx.costs[n] for n in mlp)
    grew = True
    while grew:  # one more rank at a time, module by module, while it fits
        grew = False
        for n in mlp:
            if ctx.costs[n] <= room:
                ranks[n], room, grew = ranks[n] + 1, room - ctx.costs[n], True
    if r_att:
        ranks.update(dict.fromkeys(attention, r_att))
    groups: dict[int, list[str]] = {}
    for n, rank in ranks.items():
        groups.setdefault(rank, []).append(n)
    key = {rank: "|".join(re.escape(n) for n in names) for rank, names in groups.items()}
    return {
        "r": r_att or base,
        "lora_alpha": 2 * (r_att or base),
        "rank_pattern": {key[rank]: rank for rank in groups},
        "alpha_pattern": {key[rank]: 2 * rank for rank in groups},
        **({"exclude_modules": attention} if not r_att and attention else {}),
    }


# ------------------------------------------------------------------------------------------------------- arms


def _floor(ctx: Ctx) -> int:
    """Smallest rank a module keeps: 0 at r = 1, where a floor of 1 would leave nothing to move."""
    return 0 if ctx.r == 1 else 1


def shared(ctx: Ctx) -> dict:
    """Every arm's budget: rank r on every linear layer, alpha / r = 2 (the shipped 16 / 8)."""
    return {"target_modules": "all-linear", "r": ctx.r, "lora_alpha": 2 * ctx.r}


def _params_budget(ctx: Ctx, **extra) -> dict:
    return {"budget": {"unit": "params", "floor": _floor(ctx), **extra}}


@dataclass(frozen=True)
class Arm:
    """One arm: its launcher, the shipped config it starts from, the settings of its `section` (`"dynrank"`, or the
    peer's own) from a Ctx, the knobs tuned besides the learning rate ({dotted config path: values} from a Ctx),
    and its kind: `lora` (the baseline), `static`, `control` (random decisions), `dynamic` (ours) or `peer`."""

    script: str
    config: str
    settings: Callable[[Ctx], dict]
    knobs: Callable[[Ctx], dict[str, list]] = lambda ctx: {}
    kind: str = "dynamic"
    section: str = "dynrank"


def _modalloc(strategy: str | None) -> Arm:
    """Module allocation with one strategy fixed, or (None) the strategy tuned as a knob beside k: `topk`,
    `discounted` and `multinomial` (`threshold` sizes its set by mass, not k; `uniform` is its own random control)."""

    def knobs(ctx: Ctx) -> dict[str, list]:
        if strategy == "threshold":
            return {"dynrank.modalloc.threshold": [0.5, 0.7, 0.9]}
        k = {"dynrank.modalloc.k": sorted({max(1, round(f * ctx.modules)) for f in (1 / 3, 1 / 2, 2 / 3)})}
        return k if strategy else {"dynrank.modalloc.strategy": ["topk", "discounted", "multinomial"], **k}

    return Arm(
        "train.py",
        "zero2_modalloc.json",
        lambda ctx: {
            **shared(ctx),
            "schedule": {"kind": "periodic", "interval": ctx.part(1 / 6)},
            "modalloc": {"score": "activation", **({"strategy": strategy} if strategy else {})},
        },
        knobs,
    )


def _strategies() -> tuple[str, ...]:
    from typing import get_args

    from ds_dynrank.methods.modalloc.config import Strategy

    return get_args(Strategy)


def _every(ctx: Ctx) -> dict:
    """L1RA's event schedule (its paper's 5% of the run), shared by the random control that mirrors it."""
    return {"schedule": {"interval": ctx.part(0.05)}}


def _gora_bounds(ctx: Ctx) -> dict:
    """GoRA's settings at the budget: room to grow to 4r (its cap), a floor of r/4, the budget in parameters."""
    return {**shared(ctx), "capacity": 4 * ctx.r, **_params_budget(ctx, floor=ctx.r // 4, cap=4 * ctx.r)}


ARMS: dict[str, Arm] = {
    "lora": Arm("train.py", "zero2.json", shared, kind="lora"),
    "rslora": Arm("train.py", "zero2.json", lambda ctx: {**shared(ctx), "use_rslora": True}, kind="static"),
    "mlp-heavy": Arm("train.py", "zero2.json", lambda ctx: {**shared(ctx), **mlp_heavy(ctx)}, kind="static"),
    "l1ra": Arm(
        "train.py",
        "zero2_l1ra.json",
        lambda ctx: {**shared(ctx), "capacity": 2 * ctx.r, **_params_budget(ctx), **_every(ctx)},
        lambda ctx: {"dynrank.l1ra.l1_lambda": [0.005, 0.05, 0.5]},
    ),
    # the control: L1RA's schedule, budget and capacity, random decisions; the slots moved per event tuned like a
    # knob over the sizes L1RA's events move (a tenth, a quarter, half of the modules' ranks), or replayed from a
    # run's history with `random.moves` as a list (ds_dynrank/methods/random/config.py)
    "random": Arm(
        "train.py",
        "zero2_random.json",
        lambda ctx: {**shared(ctx), "capacity": 2 * ctx.r, **_params_budget(ctx), **_every(ctx)},
        lambda ctx: {
            "dynrank.random.moves": sorted({max(1, round(f * ctx.r * ctx.modules)) for f in (0.1, 0.25, 0.5)})
        },
        kind="control",
    ),
    # the paper's round on every module, at a quarter and half of the run: scoring cost grows with the ranks scored
    "alora": Arm(
        "train.py",
        "zero2_alora.json",
        lambda ctx: {
            **shared(ctx),
            "capacity": 2 * ctx.r,
            **_params_budget(ctx),
            "schedule": {"start": ctx.part(1 / 4), "interval": ctx.part(1 / 4)},
            "alora": {"rounds": 2, "val_samples": 2},
        },
        lambda ctx: {"dynrank.alora.prune_per_round": sorted({max(1, round(f * ctx.modules)) for f in (0.5, 1, 2)})},
    ),
    "modalloc": _modalloc(None),
    **{f"modalloc-{s}": _modalloc(s) for s in _strategies()},
    # PEFT's convention: start at 1.5 x the budget's rank, prune to it
    "adalora": Arm(
        "train.py",
        "zero2_adalora.json",
        lambda ctx: {
            **shared(ctx),
            "r": math.ceil(1.5 * ctx.r),
            "budget": {"floor": _floor(ctx)},
            "adalora": {"target_r": ctx.r},
        },
        lambda ctx: {"dynrank.adalora.delta_t": sorted({ctx.part(f) for f in (0.01, 0.03, 0.1)})},
    ),
    "gora": Arm(
        "train.py",
        "zero2_gora.json",
        _gora_bounds,
        lambda ctx: {"dynrank.gora.warmup_steps": sorted({ctx.part(f) for f in (0.01, 0.03, 0.1)})},
    ),
    # ours: GoRA's allocation after 1% of the run (GoRA's best warm-up on math r1's validation split), then L1RA's
    # events every 5% with its bounds; L1RA's knob tuned
    "gora-l1ra": Arm(
        "train.py",
        "zero2_gora_l1ra.json",
        lambda ctx: {**_gora_bounds(ctx), **_every(ctx), "gora": {"warmup_steps": ctx.part(0.01)}},
        lambda ctx: {"dynrank.l1ra.l1_lambda": [0.005, 0.05, 0.5]},
    ),
    # its launcher builds AdaLoraConfig from the config's own "peft_adalora" section (PEFT's names)
    "peft-adalora": Arm(
        "train_peft_adalora.py",
        "zero0_peft_adalora.json",
        lambda ctx: {"init_r": math.ceil(1.5 * ctx.r), "target_r": ctx.r, "lora_alpha": 2 * ctx.r},
        lambda ctx: {"peft_adalora.orth_reg_weight": [0.0, 0.1, 0.5]},
        kind="peer",
        section="peft_adalora",
    ),
    # PEFT's EVA: rank redistributed once from activation SVDs, the rank sum r x modules kept (not the parameters)
    "peft-eva": Arm(
        "train_peft_eva.py",
        "zero2_peft_eva.json",
        lambda ctx: {"r": ctx.r, "lora_alpha": 2 * ctx.r},
        lambda ctx: {"peft_eva.rho": [1.5, 2.0, 4.0]},
        kind="peer",
        section="peft_eva",
    ),
}
# the headline arms (the default of --arms): one per method, the baselines, the control and the peers; the fixed
# strategies of module allocation stay runnable by name
HEADLINE = ("lora", "rslora", "mlp-heavy", "random", "l1ra", "alora", "modalloc", "adalora", "gora", "peft-adalora",
            "peft-eva")  # fmt: skip
BASELINE = "lora"


# ----------------------------------------------------------------------------------------------------- trials


def split_arms(text: str) -> list[str]:
    """'lora,random+moves=[0,2,5]' -> ['lora', 'random+moves=[0,2,5]']: the commas inside a JSON list stay its."""
    arms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            arms.append(text[start:i])
            start = i + 1
    return [*arms, text[start:]]


def parse_arm(spec: str) -> tuple[str, dict]:
    """'l1ra+l1_lambda=0.05' -> ('l1ra', {'l1_lambda': 0.05}): an arm and fixed overrides of its method's section."""
    from ds_dynrank.tools.overrides import split_overrides

    base, overrides = split_overrides(spec, "--arms")
    if base not in ARMS:
        raise ValueError(f"--arms: unknown {base!r} (known: {', '.join(ARMS)})")
    return base, overrides


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def trials(spec: str, ctx: Ctx, lrs: list[float]) -> list[dict[str, Any]]:
    """The arm's tuning trials, as many as LoRA's (one per learning rate): each learning rate once, and each value of
    every knob once (cycled when it has fewer values), paired by a permutation drawn from the arm's name, a Latin
    design. A knob fixed by an override is not tuned."""
    base, overrides = parse_arm(spec)
    grid = {k: v for k, v in ARMS[base].knobs(ctx).items() if _leaf(k) not in overrides}
    rng = random.Random(base)
    order = {k: rng.sample(range(len(lrs)), len(lrs)) for k in grid}
    return [{"lr": lr, **{k: v[order[k][i] % len(v)] for k, v in grid.items()}} for i, lr in enumerate(lrs)]


def trial_label(settings: dict[str, Any]) -> str:
    """'lr0.001+l1_lambda=0.05': a trial's directory and table name."""
    parts = [f"lr{settings['lr']:g}"] + [
        f"{_leaf(k)}={v:g}" if isinstance(v, int | float) else f"{_leaf(k)}={v}"
        for k, v in settings.items()
        if k != "lr"
    ]
    return "+".join(parts)


def _set(cfg: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[leaf] = value


def build_config(spec: str, ctx: Ctx, settings: dict[str, Any]) -> tuple[str, dict]:
    """(script, DeepSpeed config) of one arm at the budget and one trial's settings: the shipped config, the arm's
    settings, the learning rate (peak and optimizer), the knobs, then the spec's fixed overrides; validated as the
    job validates it, so a bad value stops the command naming the field before any run."""
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.methods.registry import spec as method_spec
    from ds_dynrank.tools.overrides import apply_overrides

    base, overrides = parse_arm(spec)
    arm = ARMS[base]
    cfg = json.loads((REPO / "ds_configs" / arm.config).read_text())
    section = cfg.setdefault(arm.section, {})
    for key, value in arm.settings(ctx).items():
        section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    cfg["optimizer"]["params"]["lr"] = settings["lr"]
    if "warmup_max_lr" in cfg.get("scheduler", {}).get("params", {}):
        cfg["scheduler"]["params"]["warmup_max_lr"] = settings["lr"]
    for path, value in settings.items():
        if path != "lr":
            _set(cfg, path, value)
    if arm.section != "dynrank":
        if overrides:
            raise ValueError(f"--arms: {spec!r}: {base} has no method section to override")
        return arm.script, cfg
    method = cfg["dynrank"].get("method")
    if overrides:
        if method_spec(method).section is None:
            raise ValueError(f"--arms: {spec!r}: {base} has no method section to override")
        cfg["dynrank"] = apply_overrides(cfg["dynrank"], method, overrides)
    from_ds_config(cfg)  # a bad key or value is a UserInputError naming the field, before any run starts
    return arm.script, cfg


def seed_dependent(spec: str, cfg: dict) -> bool:
    """Whether a run's config follows its seed: the random control's decisions do (unless the spec fixes
    `random.seed`), so its test seeds sample the draws as well as the initialisation and the data order."""
    return cfg.get("dynrank", {}).get("method") == "random" and "seed" not in parse_arm(spec)[1]


def for_seed(spec: str, cfg: dict, seed: int) -> dict:
    """The config of one seed's run: the arm's own, with the random control's decisions drawn from the seed."""
    if not seed_dependent(spec, cfg):
        return cfg
    seeded = json.loads(json.dumps(cfg))
    seeded["dynrank"].setdefault("random", {})["seed"] = seed
    return seeded


def arm_kind(spec: str) -> str:
    return ARMS[parse_arm(spec)[0]].kind


def start_ranks(spec: str, ctx: Ctx, cfg: dict) -> dict[str, int]:
    """The ranks an arm's run starts with (a peer: PEFT's init_r, or EVA's r, everywhere)."""
    arm = ARMS[parse_arm(spec)[0]]
    if arm.section != "dynrank":
        section = cfg[arm.section]
        return dict.fromkeys(ctx.costs, section["init_r"] if "init_r" in section else section["r"])
    return initial_ranks(cfg["dynrank"], ctx.costs)
