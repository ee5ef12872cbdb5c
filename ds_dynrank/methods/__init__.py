"""Each method: optimizer groups, per-step work, local slot scores and a pure decision. Registry: a plain dict."""

from __future__ import annotations

from ds_dynrank.config import DynRankConfig
from ds_dynrank.methods.base import FixedRank, Method
from ds_dynrank.methods.l1ra import L1RA

METHODS: dict[str, type[Method]] = {"lora": FixedRank, "l1ra": L1RA}


def build_method(cfg: DynRankConfig) -> Method:
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "Method", "build_method"]
