"""Every method the `"dynrank"` section accepts, by name: one line per method (its folder's `config.py`).

Only pydantic-level modules are imported here, so reading a config never loads torch. A method defined outside
the package joins with `register(spec)` before any config is read.
"""

from __future__ import annotations

from importlib import import_module

from ds_dynrank.methods.spec import MethodSpec

METHOD_CONFIGS = (  # the first is the default method: fixed-rank LoRA
    "ds_dynrank.methods.lora.config",
    "ds_dynrank.methods.l1ra.config",
    "ds_dynrank.methods.alora.config",
    "ds_dynrank.methods.modalloc.config",
    "ds_dynrank.methods.adalora.config",
    "ds_dynrank.methods.gora.config",
    "ds_dynrank.methods.random.config",
    "ds_dynrank.methods.gora_l1ra.config",
)

SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (its name must be new); the config schema accepts it from then on."""
    if not spec.name or spec.name in SPECS:
        raise ValueError(f"method name {spec.name!r} is empty or already registered")
    SPECS[spec.name] = spec
    return spec


def spec(name: str) -> MethodSpec:
    return SPECS[name]


for _module in METHOD_CONFIGS:
    _spec = import_module(_module).SPEC
    SPECS[_spec.name] = _spec
DEFAULT = next(iter(SPECS))
