"""The front door: `ds_dynrank.initialize(model, ds_config, total_steps=...)`, DeepSpeed's own call with the
allocator wired in.

    dynrank = ds_dynrank.initialize(model, "ds_configs/zero2_l1ra.json", total_steps=1000, output_dir="runs/a")
    for batch in loader:
        loss = dynrank.engine(**batch).loss
        dynrank.engine.backward(loss)
        dynrank.engine.step()
        dynrank.after_step()  # collective: every rank, after every engine.step()

It validates the `"dynrank"` section, injects the adapters, builds the method once, hands DeepSpeed the method's
param groups, and returns the controller, whose `.engine` is the one engine handle. `prepare()` is the part before
any engine exists, for integrations whose trainer builds the engine itself (HF Trainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ds_dynrank import checkpoint, dist
from ds_dynrank.backends import build_backend
from ds_dynrank.backends.base import Backend
from ds_dynrank.config import CoreConfig, check_deepspeed_compat, from_ds_config, load_ds_config
from ds_dynrank.controller import DynRank
from ds_dynrank.ds_config import bf16_available, resolve
from ds_dynrank.errors import UserInputError
from ds_dynrank.inject import inject_lora
from ds_dynrank.lora import LoRALinear, iter_lora
from ds_dynrank.methods.base import Method, build_method
from ds_dynrank.rundir import RunDir
from ds_dynrank.schedule import check_fits


@dataclass
class Setup:
    """A model made ready for DeepSpeed: adapters injected, the method built once, its backend chosen, and the
    adapters' trainability (or, on a resumed run, their saved shapes) set before any engine exists."""

    cfg: CoreConfig
    method: Method
    backend: Backend
    adapters: list[tuple[str, LoRALinear]]

    def optimizer_groups(self) -> list[dict]:
        """The `model_parameters` to hand to deepspeed.initialize (methods may need groups of their own)."""
        return self.method.optimizer_groups(self.adapters)


def prepare(
    model,
    cfg: CoreConfig,
    *,
    ds_config: dict | None = None,
    validation: dict | None = None,
    resume: tuple[Path, str] | None = None,
) -> Setup:
    """Inject the adapters (unless the model has them already), build the method and its backend, then either
    choose the modules that train from the first step or, resuming `(root, tag)`, shape the adapters as saved."""
    adapters = iter_lora(model) or inject_lora(model, cfg)
    method = build_method(cfg, validation=validation)
    if method.needs_validation and validation is None:
        raise UserInputError(
            f"dynrank.method: {cfg.method!r} scores ranks on a validation batch, and none was "
            "given (ds_dynrank.initialize(..., validation=batch); DynRankTrainer(..., "
            "dynrank_validation=batch))"
        )
    backend = build_backend(cfg, ds_config)
    if resume is None:
        active = method.initial_activity(len(adapters))
        if active is not None:
            backend.prepare(adapters, active)
    else:
        root, tag = resume
        ranks = checkpoint.check_resumable(
            root, tag, method=cfg.method, modules=[n for n, _ in adapters], world_size=dist.expected_world_size()
        )
        adapters = backend.resize_for_resume(model, adapters, ranks, checkpoint.saved_activity(root, tag))
    return Setup(cfg, method, backend, adapters)


def initialize(
    model,
    ds_config: dict | str | Path,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    output_dir: str | Path | None = None,
    validation: dict | None = None,
    resume: str | Path | tuple[Path, str] | None = None,
) -> DynRank:
    """`deepspeed.initialize` for a model trained with ds_dynrank adapters; returns the controller.

    `ds_config`: the DeepSpeed config (a dict or a JSON path) with its `"dynrank"` section; `"auto"` values are
    resolved as the shipped configs use them. `total_steps`: optimizer steps of the run (schedules are fractions of
    it). `steps_per_epoch`: for methods whose schedule counts epochs (ALoRA). `output_dir`: where the allocation
    history, allocation.json and TensorBoard events go (rank 0). `validation`: the fixed batch methods that score on
    one need (ALoRA). `resume`: a checkpoint (a run directory, a checkpoint root, a tag directory, or `(root, tag)`)
    to continue from; the loop's own saved state is then `dynrank.client_state`.
    Every check on the config, the schedule and the checkpoint runs before DeepSpeed starts.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    raw = load_ds_config(ds_config) if isinstance(ds_config, str | Path) else ds_config
    cfg = from_ds_config(raw)
    check_deepspeed_compat(cfg, raw)
    at = resume
    if isinstance(resume, str | Path):
        at = checkpoint.resolve(str(resume), RunDir(output_dir or ".").checkpoints)
    config = resolve(
        raw, max_steps=total_steps, output_dir=output_dir, bf16_supported=bf16_available(get_accelerator())
    )
    if at is not None and checkpoint.is_universal(*at):  # DeepSpeed re-partitions the whole values and moments
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    setup = prepare(model, cfg, ds_config=config, validation=validation, resume=at)
    if cfg.dynamic:  # a schedule that never fires would train plain LoRA in silence
        check_fits(setup.method.schedule(total_steps, steps_per_epoch), total_steps, cfg.method)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=setup.optimizer_groups(), config=config)
    dynrank = DynRank(engine, setup, total_steps=total_steps, steps_per_epoch=steps_per_epoch, output_dir=output_dir)
    if at is not None:
        dynrank.client_state = dynrank.load_checkpoint(*at)
        checkpoint.restore_rng(*at)  # dropout continues exactly: nothing may draw from the RNG before training
    return dynrank
