"""How a broadcast Plan becomes parameters, fp32 masters and Adam moments: masked (slots killed and revived in
place) or physical (tensors change shape and the engine is rebuilt). `build_backend` picks the configured one."""

from __future__ import annotations


def build_backend(cfg, ds_config: dict | None = None):
    """The configured backend. The physical one needs the DeepSpeed config it rebuilds the engine with."""
    if cfg.reshape.backend == "physical" and cfg.dynamic:
        from ds_dynrank.backends.physical import PhysicalBackend

        return PhysicalBackend(cfg.seed, ds_config)
    from ds_dynrank.backends.masked import MaskedBackend

    return MaskedBackend(cfg.seed)
