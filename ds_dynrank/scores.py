"""Importance scores as pure tensor math: no process group, no DeepSpeed. Methods feed them reduced, full-shape
values, so every rank computes the same numbers.
"""

from __future__ import annotations

import torch


def ablation_importance(loss_without_S: torch.Tensor, loss_alone_S: torch.Tensor) -> torch.Tensor:
    """ALoRA's AB-LoRA importance up to the constant S(M): IS(r) = S(M) - S(M\\r) + S(M_r) with S = -loss, so
    IS(r) - S(M) = loss(M\\r) - loss(M_r). High when removing the rank hurts and the rank alone does well."""
    return loss_without_S - loss_alone_S


def sensitivity_ema(
    ipt_avg: torch.Tensor, unc_avg: torch.Tensor, value: torch.Tensor, grad: torch.Tensor, *, beta1: float, beta2: float
) -> None:
    """AdaLoRA's smoothed sensitivity, in place (PEFT's RankAllocator.update_ipt): I = |w * g|,
    Ī <- b1 Ī + (1 - b1) I, Ū <- b2 Ū + (1 - b2) |I - Ī| (the updated Ī, as PEFT)."""
    ipt = (value * grad).abs()
    ipt_avg.mul_(beta1).add_(ipt, alpha=1 - beta1)
    unc_avg.mul_(beta2).add_((ipt - ipt_avg).abs(), alpha=1 - beta2)


def element_score(ipt_avg: torch.Tensor, unc_avg: torch.Tensor) -> torch.Tensor:
    """s = Ī * Ū."""
    return ipt_avg * unc_avg


def triplet_scores(score_A: torch.Tensor, score_B: torch.Tensor, score_gate: torch.Tensor | None) -> torch.Tensor:
    """Per slot i: s(gate_i) + mean_j s(A_ij) + mean_j s(B_ji), AdaLoRA's triplet score (the gate stands for its
    singular value E_i). A is [R, I], B is [O, R]; returns [R]."""
    total = score_A.mean(dim=1) + score_B.mean(dim=0)
    return total if score_gate is None else total + score_gate


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its labelled positions: [N]. (HF's loss averages
    over the whole batch; ablation variants need one loss each.)"""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != ignore_index).sum(dim=1).clamp_min(1)
    return token.sum(dim=1) / counted


def gradient_importance(grad: torch.Tensor, weight: torch.Tensor | None, kind: str) -> float:
    """GoRA's module importance from the summed gradient G of a frozen weight W (arXiv 2502.12171): `sensitivity`
    = mean |W * G| (the paper's), `grad_norm` = ||G||_F (no W)."""
    if kind == "sensitivity":
        return float((weight.detach().float() * grad.detach().float()).abs().mean())
    if kind == "grad_norm":
        return float(grad.detach().float().norm())
    raise ValueError(f"unknown importance {kind!r} (known: sensitivity, grad_norm)")
