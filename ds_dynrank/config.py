"""The `"dynrank"` section of the DeepSpeed JSON: one strictly validated pydantic schema.

DeepSpeed ignores unknown top-level keys, so this schema is the only validation the section gets:
unknown keys, wrong types and contradictory values are errors that name the field, before training.
The core fields live here; each method adds its own sub-section and rules from its folder (the registry), so
this file names no method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import hjson
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from ds_dynrank.errors import UserInputError
from ds_dynrank.methods import registry
from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section, check_regex

SECTION = "dynrank"


class ScheduleConfig(Section):
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


class BudgetConfig(Section):
    unit: Literal["rank", "params"] = "rank"
    """What the budget counts: total rank over all modules (L1RA's sum of r), or total adapter parameters (a rank
    of a module costs in_features + out_features, so a wide MLP projection costs more than k_proj). Under `params`,
    parameters an event frees but cannot spend on whole ranks carry to the next event: the budget holds within
    one rank of the costliest module. Default: `rank`, or `params` for `gora` (its paper's budget)."""

    floor: int = Field(1, ge=0)
    """Smallest rank any module keeps."""

    cap: int | None = Field(None, ge=1)
    """Largest rank any module may reach. Default: the module's capacity (masked backend) or 4 x its initial rank
    (physical backend). vLLM serves an adapter at one max_lora_rank (8, 16, 32, 64, 128, 256, 320 or 512) sized to
    its largest module: set cap to the one you serve at to keep the allocation inside it."""


class ReshapeConfig(Section):
    backend: Literal["masked", "physical"] = "masked"
    """`masked`: fixed capacity per module, slots killed and revived in place (fast). `physical`: tensors really
    change shape; pruned ranks free memory and a module can grow past its initial size."""


class CoreConfig(Section):
    """The fields every method shares; `DynRankConfig` adds `method` and the methods' own sections."""

    method: str = registry.DEFAULT
    """Adaptation method (the registered names; see DynRankConfig)."""

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
    module's initial rank for methods that grow ranks (`l1ra`, `alora`, `gora`, `random`), the initial rank
    otherwise. Slots beyond the initial rank start masked off."""

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

    @property
    def spec(self) -> MethodSpec:
        """The method's registry entry: its defaults, rules and implementation."""
        return registry.spec(self.method)

    @property
    def dynamic(self) -> bool:
        return self.spec.dynamic

    @property
    def use_gate(self) -> bool:
        return self.gate if self.gate is not None else self.spec.gate

    @property
    def grows(self) -> bool:
        """Can a module's rank rise above its initial rank?"""
        return self.spec.grows

    @property
    def validation_samples(self) -> int:
        """Training examples the method scores on, held out of training (0: none)."""
        return self.spec.validation_samples(self)

    def slot_capacity(self, rank: int) -> int:
        """Slots a module with this initial rank is built with."""
        if self.capacity is not None:
            return max(self.capacity, rank)
        return 2 * rank if self.grows and self.reshape.backend == "masked" else rank

    def check_cap_fits(self) -> None:
        """For methods that may give one module all of budget.cap (gora, random): the masked backend cannot grow a
        module past its spare slots."""
        cap, room = self.budget.cap, min(self.slot_capacity(r) for r in [self.r, *self.rank_pattern.values()])
        if self.reshape.backend == "masked" and cap is not None and cap > room:
            raise ValueError(
                f"budget.cap ({cap}) exceeds the masked backend's capacity ({room} slots): raise capacity to "
                "at least budget.cap, or use reshape.backend: physical"
            )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """A method's own default of `budget.unit` (gora: params), where the section leaves it unset."""
        if not isinstance(data, dict):
            return data
        spec = registry.SPECS.get(data.get("method", registry.DEFAULT))
        unit = getattr(spec, "budget_unit", "rank")
        budget = data.get("budget")
        if unit != "rank" and (budget is None or isinstance(budget, dict) and "unit" not in budget):
            data = {**data, "budget": {**(budget or {}), "unit": unit}}
        return data

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError('must be "all-linear", a regex or a non-empty list of module names')
            if value != "all-linear":
                check_regex(value, "target_modules")
        elif not value:
            raise ValueError("must name at least one module")
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        for key, v in value.items():
            check_regex(key, info.field_name)
            if v <= 0:
                raise ValueError(f"{info.field_name}[{key!r}] must be > 0, got {v}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CoreConfig:
        ranks = [self.r, *self.rank_pattern.values()]
        if self.capacity is not None and self.capacity < max(ranks):
            raise ValueError(f"capacity ({self.capacity}) must be >= the largest initial rank ({max(ranks)})")
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
        readers = {self.method, *self.spec.uses}
        for other in registry.SPECS.values():
            if other.section is not None and other.name in self.model_fields_set and other.name not in readers:
                raise ValueError(f"{other.name}: only used by method {other.name}, but method is {self.method!r}")
        self.spec.check(self)
        return self


def _method_doc() -> str:
    return "Adaptation method. " + " ".join(f"`{s.name}`: {s.summary}" for s in registry.SPECS.values())


def build_config_class() -> type[CoreConfig]:
    """The core fields, `method` restricted to the registered names, and one sub-section per method with knobs."""
    names = tuple(registry.SPECS)
    sections = {
        s.name: (s.section, Field(default_factory=s.section, description=s.section_doc))
        for s in registry.SPECS.values()
        if s.section is not None
    }
    method = (Literal[names], Field(registry.DEFAULT, description=_method_doc()))
    return create_model("DynRankConfig", __base__=CoreConfig, __module__=__name__, method=method, **sections)


_BUILT: dict[tuple[str, ...], type[CoreConfig]] = {}


def config_class() -> type[CoreConfig]:
    """The schema for the methods registered now (built once per set of methods: a method registered later is
    accepted from then on)."""
    names = tuple(registry.SPECS)
    if names not in _BUILT:
        _BUILT[names] = build_config_class()
    return _BUILT[names]


def __getattr__(name: str):
    if name == "DynRankConfig":  # `from ds_dynrank.config import DynRankConfig`: the schema of today's registry
        return config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_deepspeed_compat(cfg: CoreConfig, ds_config: dict[str, Any]) -> None:
    """DeepSpeed settings a method cannot work with, refused before anything runs."""
    optimizer = ds_config.get("optimizer") or {}
    kind = str(optimizer.get("type", "")).lower()
    decay = (optimizer.get("params") or {}).get("weight_decay", 0.01 if kind == "adamw" else 0.0)
    problem = cfg.spec.weight_decay_problem(cfg, decay)
    if problem:
        raise UserInputError(f"optimizer.params.weight_decay: {problem}")
    problem = offload_problem(ds_config.get("zero_optimization") or {}) if cfg.dynamic else None
    if problem:
        raise UserInputError(f"zero_optimization.{problem}")


_UNREACHED = "so the re-allocation engine could not carry the surviving ranks' fp32 values and Adam moments exactly"


def offload_problem(zero: dict[str, Any]) -> str | None:
    """Why a ZeRO offload setting cannot run under re-allocation events (None: it can). Host offload (`"device":
    "cpu"`) of the optimizer state and, under ZeRO-3, of the parameters is tested; these are not."""
    if zero.get("zenflow") is not None:
        return (
            "zenflow: not supported with a dynamic method: ZenFlow keeps deferred updates (stale parameters, "
            f"accumulated gradients) outside the optimizer state and may apply them in another process, {_UNREACHED}"
        )
    for key in ("offload_optimizer", "offload_param"):
        if str(_section(zero, key).get("device", "none")).lower() == "nvme":
            return (
                f"{key}.device: 'nvme' is not supported with a dynamic method: DeepSpeed swaps that state through "
                "its async_io op, which cannot be built where ds_dynrank is tested (it needs libaio), and the "
                "re-allocation engine writes partitions and Adam state in memory, past the swapper; use 'cpu'"
            )
    if str(zero.get("stage", 0)) != "3":  # partial offload and SuperOffload are ZeRO-3's (ignored below)
        return None
    optimizer = _section(zero, "offload_optimizer")
    ratio = optimizer.get("ratio", 1.0)
    if isinstance(ratio, int | float) and ratio < 1.0:
        return (
            f"offload_optimizer.ratio: {ratio} (partial offload) is not supported with a dynamic "
            "method: DeepSpeed steps the sub-groups it keeps on the accelerator with a second optimizer whose Adam "
            f"state neither its safe_get/set_full_optimizer_state accessors nor ds_dynrank reach, {_UNREACHED}; "
            "use 1.0"
        )
    if optimizer.get("super_offload"):
        return (
            "offload_optimizer.super_offload: not supported with a dynamic method: SuperOffload runs CPU Adam in a "
            f"worker process of its own, which holds the fp32 masters and Adam moments, {_UNREACHED}; leave it off"
        )
    return None


def _section(zero: dict[str, Any], key: str) -> dict[str, Any]:
    """A sub-section as a dict (anything else is DeepSpeed's to reject)."""
    value = zero.get(key)
    return value if isinstance(value, dict) else {}


def format_validation_error(err: ValidationError, section: str = SECTION) -> str:
    """One line per problem: `dynrank.<field>: <what is wrong> (got <value>)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (section, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = ", ".join(config_class().model_fields)
            msg = f"unknown key (known keys: {known})"
        elif "input" in e and e["type"] not in ("value_error", "missing"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def from_ds_config(ds_config: dict[str, Any]) -> CoreConfig:
    """Validate the `"dynrank"` section of an already-loaded DeepSpeed config dict."""
    section = ds_config.get(SECTION, {})
    if not isinstance(section, dict):
        raise UserInputError(f"{SECTION}: expected a JSON object, got {type(section).__name__}")
    try:
        return config_class()(**section)
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
    model = model or config_class()
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
