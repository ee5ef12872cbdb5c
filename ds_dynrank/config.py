"""The `"dynrank"` section of the DeepSpeed JSON: one strictly validated pydantic schema.

DeepSpeed ignores unknown top-level keys, so this schema is the only validation the section gets:
unknown keys, wrong types and contradictory values are errors that name the field, before training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import hjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ds_dynrank.errors import UserInputError

SECTION = "dynrank"
METHODS = ("lora", "l1ra", "alora", "modalloc", "adalora")
DYNAMIC = ("l1ra", "alora", "modalloc", "adalora")
METHOD_SECTIONS = ("l1ra", "alora", "modalloc", "adalora")  # each method's own knobs, allowed with it only
AVAILABLE_BACKENDS = ("masked", "physical")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}: {pattern!r} is not a valid regular expression ({err})") from None


class ScheduleConfig(_Section):
    kind: Literal["periodic", "once"] = "periodic"
    """`periodic`: an event at start, start + interval, ... up to stop. `once`: a single event at `start`
    (DynaLoRA's reallocate-once-after-N)."""

    start: int | None = Field(None, ge=1)
    """First re-allocation event, in optimizer steps. Default: one interval into the run."""

    interval: int | None = Field(None, ge=1)
    """Optimizer steps between events. Default: the method's own (L1RA: 5% of --max_steps, its paper's
    rank_update_ratio; ALoRA: alora.k2_epochs; modalloc: 10% of --max_steps)."""

    stop: int | None = Field(None, ge=1)
    """Last step at which an event may fire. Default: the step before the last."""

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleConfig:
        if self.start is not None and self.stop is not None and self.start > self.stop:
            raise ValueError(f"start ({self.start}) must be <= stop ({self.stop})")
        if self.kind == "once" and (self.interval is not None or self.stop is not None):
            raise ValueError("kind 'once' fires at start only: leave interval and stop unset")
        return self


class BudgetConfig(_Section):
    unit: Literal["rank", "params"] = "rank"
    """What the budget counts: total rank over all modules (L1RA's sum of r), or total adapter parameters (a rank
    of a module costs in_features + out_features, so a wide MLP projection costs more than k_proj)."""

    floor: int = Field(1, ge=0)
    """Smallest rank any module keeps."""

    cap: int | None = Field(None, ge=1)
    """Largest rank any module may reach. Default: the module's capacity (masked backend) or 4 x its initial rank
    (physical backend)."""


class ReshapeConfig(_Section):
    backend: Literal["masked", "physical"] = "masked"
    """`masked`: fixed capacity per module, slots killed and revived in place (fast). `physical`: tensors really
    change shape; pruned ranks free memory and a module can grow past its initial size."""


class L1RAConfig(_Section):
    l1_lambda: float = Field(0.005, ge=0)
    """L1 strength on the gates, applied as a proximal step decoupled from Adam (paper configs: 0.005)."""

    gate_lr: float = Field(0.02, gt=0)
    """Constant learning rate of the gate vectors, for Adam and for the proximal step (paper configs: 0.02)."""

    threshold: float | None = Field(None, ge=0)
    """A live rank whose gate is below this is pruned at an event. Default: gate_lr x l1_lambda + 1e-6, i.e.
    less than one L1 step from zero (the reference code's rule)."""

    exclude_pruned: bool = True
    """Freed ranks go first to modules that pruned nothing in this event (the reference code's rule)."""

    @property
    def prune_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.gate_lr * self.l1_lambda + 1e-6


class ALoRAConfig(_Section):
    rounds: int = Field(8, ge=1)
    """N_A: allocation rounds (prune, then grow the modules that lost nothing), one every K2 (paper: up to 8)."""

    prune_per_round: int | None = Field(None, ge=1)
    """n_A: ranks pruned per round, the lowest AB-LoRA importance first, and handed to modules that lost none.
    Default: the number of adapted modules (the paper's 1 x N_mod)."""

    val_samples: int = Field(32, ge=1)
    """|B_val|: examples in the fixed scoring batch, held out of the training data (paper: 32)."""

    variants_per_forward: int = Field(4, ge=1)
    """Ablation variants (rank removed, or kept alone) evaluated in one batched forward, through per-example
    slot masks: larger is faster and needs variants_per_forward x val_samples sequences of activation memory."""

    k1_epochs: float = Field(1.0, gt=0)
    """K1: training before the first round, in epochs (paper: 1), when schedule.start is unset."""

    k2_epochs: float = Field(0.25, gt=0)
    """K2: training between rounds, in epochs (paper: 0.25), when schedule.interval is unset."""


class ModAllocConfig(_Section):
    score: Literal["activation", "gradient"] = "activation"
    """Module importance: `activation` = cumulative per-token L2 norm of the module's output (DynaLoRA, LoRA-drop
    style), `gradient` = cumulative L2 norm of its adapter gradients; summed over micro-batches and ranks."""

    strategy: Literal["topk", "threshold", "multinomial", "discounted", "uniform"] = "topk"
    """Which modules train until the next event: the `k` most important (`topk`); the smallest top set whose
    normalised importance sums to >= `threshold`; `k` drawn with probability proportional to importance
    (`multinomial`) or to importance / times already chosen (`discounted`); `k` uniformly at random (`uniform`).
    Random draws happen on rank 0 from a seeded generator and are broadcast."""

    k: int | None = Field(None, ge=1)
    """Modules active at a time. Default: two thirds of the adapted modules (DynaLoRA's 16 of 24)."""

    threshold: float | None = Field(None, gt=0, le=1)
    """Strategy `threshold`: the importance mass p in (0, 1] the active set must cover (default 0.9)."""

    @model_validator(mode="after")
    def _strategy_fields(self) -> ModAllocConfig:
        if self.strategy == "threshold" and self.k is not None:
            raise ValueError("k: strategy 'threshold' sizes the active set by threshold, not k")
        if self.strategy != "threshold" and self.threshold is not None:
            raise ValueError(f"threshold: only used by strategy 'threshold', not {self.strategy!r}")
        return self


class AdaLoRAConfig(_Section):
    target_r: float | None = Field(None, gt=0)
    """Average rank per module at the end of the budget schedule (PEFT's target_r). Default: 2/3 of r (PEFT's
    init_r 12 -> target_r 8)."""

    tinit: int | None = Field(None, ge=0)
    """Steps of warm-up before any pruning (PEFT's tinit). Default: 10% of --max_steps."""

    tfinal: int | None = Field(None, ge=0)
    """Steps at the end trained at the final allocation (PEFT's tfinal). Default: 20% of --max_steps."""

    delta_t: int | None = Field(None, ge=1)
    """Steps between allocation events during the cubic schedule (PEFT's deltaT). Default: 1% of --max_steps,
    at least 1."""

    beta1: float = Field(0.85, gt=0, lt=1)
    """EMA factor of the sensitivity |w * grad| (PEFT's beta1)."""

    beta2: float = Field(0.85, gt=0, lt=1)
    """EMA factor of its uncertainty |I - EMA(I)| (PEFT's beta2)."""


class DynRankConfig(_Section):
    method: Literal["lora", "l1ra", "alora", "modalloc", "adalora"] = "lora"
    """Adaptation method. `lora`: fixed-rank LoRA (the baseline every dynamic method is measured against).
    `l1ra`: gates under an L1 penalty, ranks whose gate reaches zero pruned and re-assigned (arXiv 2509.04884).
    `alora`: AB-LoRA ablation importance per rank, prune the lowest and grow modules that lost none
    (arXiv 2403.16187). `modalloc`: a subset of modules trains at a time, chosen by importance (DynaLoRA).
    `adalora`: AdaLoRA's sensitivity x uncertainty scores with its cubic budget schedule (arXiv 2303.10512)."""

    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: `"all-linear"` (every Linear/Conv1D but the output head), a list of names (exact or
    dotted suffix, PEFT style) or one regular expression matched against the full module name."""

    exclude_modules: list[str] = Field(default_factory=list)
    """Names (exact or dotted suffix) never adapted, even when `target_modules` matches them."""

    r: int = Field(8, ge=1)
    """Initial LoRA rank of every adapted module."""

    rank_pattern: dict[str, int] = Field(default_factory=dict)
    """Per-module initial rank: `{regex or name suffix: rank}`, overriding `r` (PEFT's `rank_pattern`)."""

    lora_alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the adapter output is multiplied by `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), using
    the module's initial rank. The factor is held constant when ranks are re-allocated, so surviving ranks compute
    exactly what they computed before."""

    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    """Per-module `lora_alpha`: `{regex or name suffix: alpha}` (PEFT's `alpha_pattern`)."""

    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout applied to the adapter input."""

    use_rslora: bool = False
    """Rank-stabilised scaling `lora_alpha / sqrt(r)` instead of `lora_alpha / r`."""

    init_lora_weights: Literal["kaiming", "gaussian"] = "kaiming"
    """Init of A (B is always 0, so training starts from the base model): `kaiming` as PEFT's default
    (Kaiming-uniform, a=sqrt(5)), `gaussian` as N(0, 1/r)."""

    gate: bool | None = None
    """Put a trainable gate vector between A and B: `B diag(gate) A`, initialised to 1. Default: on for `l1ra`
    (which needs it) and `adalora` (the gate plays AdaLoRA's singular values E), off otherwise."""

    capacity: int | None = Field(None, ge=1)
    """Slots allocated per module under the masked backend (the most rank a module can hold). Default: 2 x the
    module's initial rank for methods that grow ranks (`l1ra`, `alora`), the initial rank otherwise. Slots beyond
    the initial rank start masked off."""

    on_missed_event: Literal["error", "warn"] = "error"
    """What happens when a dynamic method's first event is due but `DynRank.after_step()` was never called (a loop
    or trainer that does not drive the allocator would otherwise train plain LoRA in silence): stop with an error,
    or warn once and go on."""

    seed: int = 0
    """Seed of the generator that initialises re-born slots: the same on every rank, so all ranks agree."""

    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """When re-allocation events fire (dynamic methods)."""

    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    """What is conserved across events, and per-module bounds (dynamic methods)."""

    reshape: ReshapeConfig = Field(default_factory=ReshapeConfig)
    """How a decision is applied to parameters, fp32 masters and Adam moments (dynamic methods)."""

    l1ra: L1RAConfig = Field(default_factory=L1RAConfig)
    """L1RA's knobs (method `l1ra`)."""

    alora: ALoRAConfig = Field(default_factory=ALoRAConfig)
    """ALoRA's knobs (method `alora`)."""

    modalloc: ModAllocConfig = Field(default_factory=ModAllocConfig)
    """Dynamic module allocation's knobs (method `modalloc`)."""

    adalora: AdaLoRAConfig = Field(default_factory=AdaLoRAConfig)
    """AdaLoRA-style scorer's knobs (method `adalora`)."""

    @property
    def dynamic(self) -> bool:
        return self.method in DYNAMIC

    @property
    def use_gate(self) -> bool:
        return self.gate if self.gate is not None else self.method in ("l1ra", "adalora")

    @property
    def grows(self) -> bool:
        """Can a module's rank rise above its initial rank?"""
        return self.method in ("l1ra", "alora")

    def slot_capacity(self, rank: int) -> int:
        """Slots a module with this initial rank is built with."""
        if self.capacity is not None:
            return max(self.capacity, rank)
        return 2 * rank if self.grows and self.reshape.backend == "masked" else rank

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError('must be "all-linear", a regex or a non-empty list of module names')
            if value != "all-linear":
                _check_regex(value, "target_modules")
        elif not value:
            raise ValueError("must name at least one module")
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        for key, v in value.items():
            _check_regex(key, info.field_name)
            if v <= 0:
                raise ValueError(f"{info.field_name}[{key!r}] must be > 0, got {v}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DynRankConfig:
        ranks = [self.r, *self.rank_pattern.values()]
        if self.capacity is not None and self.capacity < max(ranks):
            raise ValueError(f"capacity ({self.capacity}) must be >= the largest initial rank ({max(ranks)})")
        if self.method == "l1ra" and self.gate is False:
            raise ValueError("gate: method l1ra needs gate: true (or leave gate unset)")
        if self.reshape.backend not in AVAILABLE_BACKENDS:
            raise ValueError(
                f"reshape.backend: {self.reshape.backend!r} is not available in this version "
                f"(available: {', '.join(AVAILABLE_BACKENDS)})"
            )
        masked = self.reshape.backend == "masked"
        if self.capacity is not None and self.dynamic and not self.grows:
            raise ValueError(f"capacity: method {self.method!r} never grows a module, so it needs no spare slots")
        if self.dynamic and not masked and self.capacity is not None:
            raise ValueError("capacity: a masked-backend setting; the physical backend sizes each module to its rank")
        if self.dynamic and not masked and self.budget.floor < 1:
            raise ValueError("budget.floor: the physical backend needs >= 1 (a module cannot hold a rank-0 tensor)")
        if self.grows and masked and self.capacity is not None and self.capacity <= min(ranks):
            raise ValueError(
                f"capacity ({self.capacity}) leaves no free slot to grow into under the masked backend; "
                f"use capacity > {min(ranks)} or reshape.backend: physical"
            )
        if self.budget.floor > min(ranks):
            raise ValueError(f"budget.floor ({self.budget.floor}) exceeds the smallest initial rank ({min(ranks)})")
        if self.budget.cap is not None and self.budget.cap < max(ranks):
            raise ValueError(f"budget.cap ({self.budget.cap}) is below the largest initial rank ({max(ranks)})")
        if not self.dynamic:
            stray = [k for k in ("schedule", "budget", "reshape") if k in self.model_fields_set]
            if stray:
                raise ValueError(f"{', '.join(stray)}: only used by a dynamic method, but method is {self.method!r}")
        for section in METHOD_SECTIONS:
            if section in self.model_fields_set and self.method != section:
                raise ValueError(f"{section}: only used by method {section}, but method is {self.method!r}")
        if self.method == "adalora":
            if "schedule" in self.model_fields_set:
                raise ValueError("schedule: method adalora follows its cubic schedule: set adalora.tinit, "
                                 "adalora.tfinal and adalora.delta_t instead")  # fmt: skip
            if self.budget.unit != "rank":
                raise ValueError("budget.unit: method adalora counts its budget in ranks (PEFT's target_r)")
            target = self.adalora.target_r
            if target is not None and target > self.r:
                raise ValueError(f"adalora.target_r ({target}) must be <= r ({self.r}): AdaLoRA only prunes")
        if self.method == "modalloc" and "budget" in self.model_fields_set:
            raise ValueError("budget: method modalloc keeps every rank; size the active set with modalloc.k")
        return self


def check_deepspeed_compat(cfg: DynRankConfig, ds_config: dict[str, Any]) -> None:
    """DeepSpeed settings a method cannot work with, refused before anything runs."""
    optimizer = ds_config.get("optimizer") or {}
    kind = str(optimizer.get("type", "")).lower()
    decay = (optimizer.get("params") or {}).get("weight_decay", 0.01 if kind == "adamw" else 0.0)
    if cfg.method == "modalloc" and cfg.reshape.backend == "masked" and decay:
        raise UserInputError(
            f"optimizer.params.weight_decay: {decay} with dynrank method 'modalloc' on the masked backend would "
            "shrink the adapters of inactive modules, which must stay still; set it to 0, or use "
            'dynrank.reshape.backend "physical" (inactive adapters leave the optimizer)'
        )


def format_validation_error(err: ValidationError, section: str = SECTION) -> str:
    """One line per problem: `dynrank.<field>: <what is wrong> (got <value>)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = ", ".join(DynRankConfig.model_fields)
            msg = f"unknown key (known keys: {known})"
        elif "input" in e and e["type"] not in ("value_error", "missing"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def from_ds_config(ds_config: dict[str, Any]) -> DynRankConfig:
    """Validate the `"dynrank"` section of an already-loaded DeepSpeed config dict."""
    section = ds_config.get(SECTION, {})
    if not isinstance(section, dict):
        raise UserInputError(f"{SECTION}: expected a JSON object, got {type(section).__name__}")
    try:
        return DynRankConfig(**section)
    except ValidationError as err:
        raise UserInputError(format_validation_error(err)) from None


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON (hjson, as DeepSpeed itself reads it) once; the same dict feeds both parsers."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--deepspeed: config file not found: {path}")
    try:
        with path.open() as f:
            data = hjson.load(f, object_pairs_hook=_no_duplicate_keys)
    except (hjson.HjsonDecodeError, ValueError) as err:
        raise UserInputError(f"--deepspeed: {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"--deepspeed: {path} must hold a JSON object")
    return dict(data)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " or ".join(json.dumps(a) for a in get_args(annotation))
    text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def schema_table(model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """The README's config table, generated from the schema so the two never drift apart."""
    model = model or DynRankConfig
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"] if not prefix else []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows.append(f"| `{prefix}{name}` | object | | {' '.join((field.description or '').split())} |")
            rows.append(schema_table(field.annotation, f"{prefix}{name}."))
            continue
        default = field.default_factory() if field.default_factory else field.default
        doc = " ".join((field.description or "").split())
        kind = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kind} | `{json.dumps(default)}` | {doc} |")
    return "\n".join(rows)
