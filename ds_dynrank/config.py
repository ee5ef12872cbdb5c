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
METHODS = ("lora",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}: {pattern!r} is not a valid regular expression ({err})") from None


class DynRankConfig(_Section):
    method: Literal["lora"] = "lora"
    """Adaptation method. `lora`: fixed-rank LoRA (the baseline every dynamic method is measured against)."""

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

    gate: bool = False
    """Put a trainable gate vector between A and B: `B diag(gate) A` (L1RA's parametrisation), initialised to 1."""

    capacity: int | None = Field(None, ge=1)
    """Slots allocated per module (the most rank a module can hold without a physical reshape). Default: the
    module's initial rank. Slots beyond the initial rank start masked off."""

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
    def _capacity_holds_initial_ranks(self) -> DynRankConfig:
        largest = max([self.r, *self.rank_pattern.values()])
        if self.capacity is not None and self.capacity < largest:
            raise ValueError(f"capacity ({self.capacity}) must be >= the largest initial rank ({largest})")
        return self


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


def schema_table(model: type[BaseModel] = None, prefix: str = "") -> str:
    """The README's config table, generated from the schema so the two never drift apart."""
    model = model or DynRankConfig
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"] if not prefix else []
    for name, field in model.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        doc = " ".join((field.description or "").split())
        kind = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kind} | `{json.dumps(default)}` | {doc} |")
    return "\n".join(rows)
