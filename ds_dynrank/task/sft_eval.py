"""Held-out SFT metrics, computed across ranks: loss on the labelled (completion) tokens weighted by tokens over every
rank, perplexity = exp(loss), mean token accuracy, and exact match of greedy answers.

Every rank evaluates its share, padded so that all run the same number of forwards (under ZeRO-3 a forward, and
each generation step, is a collective); padding examples weigh nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ds_dynrank import dist
from ds_dynrank.task.classification import shard_for_rank
from ds_dynrank.task.sft import IGNORE, Example, collate


def token_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: [summed NLL, labelled tokens, tokens predicted right] of next-token prediction, fp64 [N, 3]."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    counted = labels != IGNORE
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    right = (logits.argmax(-1) == labels) & counted
    return torch.stack([nll.sum(1), counted.sum(1), right.sum(1)], dim=1).double()


@torch.no_grad()
def evaluate_loss(
    forward: Callable, examples: Sequence[Example], *, batch_size: int, pad_id: int, device
) -> dict[str, float]:
    """eval_loss, perplexity and token_accuracy over `examples`, summed over ranks (collective)."""
    indices, weights = shard_for_rank(len(examples), dist.rank(), dist.world_size())
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, len(indices), batch_size):
        batch = collate([examples[i] for i in indices[start : start + batch_size]], pad_id)
        w = torch.tensor(weights[start : start + batch_size], dtype=torch.float64, device=device)
        logits = forward(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        totals += (token_sums(logits.logits, batch["labels"].to(device)) * w[:, None]).sum(0)
    nll, tokens, right = dist.all_reduce_sum(totals).cpu().tolist()
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": right / max(tokens, 1.0)}


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left, as generation needs them (every prompt ends where decoding starts)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match: the decoded answer, stripped, equals the reference, stripped."""
    return generated.strip() == answer.strip()


@torch.no_grad()
def greedy_answers(
    model,
    examples: Sequence[Example],
    decode: Callable[[list[int]], str],
    *,
    batch_size: int,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    device,
    synced: bool,
) -> list[dict]:
    """Every example's greedy answer (at most `max_new_tokens`, up to the end-of-turn token), gathered from every
    rank (collective), in example order: {index, prompt, answer (the reference), generated, correct}. Kept so that
    an exact-match number can be checked question by question. `synced`: every rank keeps stepping until all
    finished (ZeRO-3, where each step gathers the weights)."""
    indices, weights = shard_for_rank(len(examples), dist.rank(), dist.world_size())
    mine = []
    for start in range(0, len(indices), batch_size):
        chosen = indices[start : start + batch_size]
        ids, mask = left_pad([examples[i].prompt_ids for i in chosen], pad_id)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            use_cache=True,
            synced_gpus=synced,
        )
        for i, row, w in zip(chosen, out[:, ids.shape[1] :].tolist(), weights[start : start + batch_size]):
            if not w:  # padding: a repeat of an example another step already answered
                continue
            if eos_id in row:
                row = row[: row.index(eos_id)]
            e, generated = examples[i], decode(row)
            mine.append({"index": i, "prompt": decode(e.prompt_ids), "answer": e.answer, "generated": generated,
                         "correct": answer_matches(generated, e.answer)})  # fmt: skip
    return sorted((a for part in dist.all_gather_object(mine) for a in part), key=lambda a: a["index"])


def exact_match(answers: Sequence[dict]) -> float:
    """The share of `answers` (from `greedy_answers`) that equal their reference."""
    return sum(a["correct"] for a in answers) / max(len(answers), 1)
