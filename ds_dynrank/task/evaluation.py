"""Held-out accuracy of a causal LM that answers with one of the label names, computed across ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ds_dynrank import dist
from ds_dynrank.task.classification import TaskData, shard_for_rank


def candidate_logprobs(
    forward: Callable[..., object], prompts: list[list[int]], candidate_ids: list[list[int]], pad_id: int, device
) -> torch.Tensor:
    """log p(candidate | prompt) for every prompt and candidate: [B, n_candidates] fp32.

    Single-token candidates need one forward over the prompts; longer ones one over every prompt+candidate pair.
    """
    single = all(len(c) == 1 for c in candidate_ids)
    seqs = prompts if single else [p + c for p in prompts for c in candidate_ids]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = forward(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = F.log_softmax(logits, dim=-1).cpu()
    if single:
        last = torch.tensor([len(p) - 1 for p in prompts])
        tokens = torch.tensor([c[0] for c in candidate_ids])
        return logp[torch.arange(len(prompts)), last][:, tokens]
    scores = torch.empty(len(seqs))
    for i, (p, c) in enumerate((p, c) for p in prompts for c in candidate_ids):
        positions = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        scores[i] = logp[i, positions, torch.tensor(c)].sum()
    return scores.view(len(prompts), len(candidate_ids))


@torch.no_grad()
def evaluate(forward: Callable[..., object], task: TaskData, *, batch_size: int, device) -> dict[str, float]:
    """Accuracy and mean gold-label NLL over the whole eval split, summed across data-parallel ranks."""
    indices, weights = shard_for_rank(len(task.eval), dist.rank(), dist.world_size())
    totals = torch.zeros(3, dtype=torch.float64)  # correct, count, nll
    for start in range(0, len(indices), batch_size):
        batch = [task.eval[i] for i in indices[start : start + batch_size]]
        w = torch.tensor(weights[start : start + batch_size], dtype=torch.float64)
        logp = candidate_logprobs(forward, [e["prompt_ids"] for e in batch], task.candidate_ids, task.pad_id, device)
        gold = torch.tensor([e["label"] for e in batch])
        correct = (logp.argmax(-1) == gold).double()
        nll = -logp[torch.arange(len(batch)), gold].double()
        totals += torch.stack([(w * correct).sum(), w.sum(), (w * nll).sum()])
    totals = dist.all_reduce_sum(totals.to(device)).cpu()
    return {"accuracy": (totals[0] / totals[1]).item(), "eval_loss": (totals[2] / totals[1]).item()}
