"""Each method: optimizer groups, per-step work, local slot scores and a pure decision. Registry: a plain dict."""

from __future__ import annotations

from ds_dynrank.config import DynRankConfig
from ds_dynrank.methods.adalora import AdaLoRA
from ds_dynrank.methods.alora import ALoRA
from ds_dynrank.methods.base import FixedRank, Method
from ds_dynrank.methods.l1ra import L1RA
from ds_dynrank.methods.modalloc import ModAlloc

METHODS: dict[str, type[Method]] = {"lora": FixedRank, "l1ra": L1RA, "alora": ALoRA, "modalloc": ModAlloc,
                                    "adalora": AdaLoRA}  # fmt: skip


def build_method(cfg: DynRankConfig) -> Method:
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "Method", "build_method"]
