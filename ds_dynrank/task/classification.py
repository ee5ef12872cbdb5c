"""A labelled text dataset framed for a causal LM: `prompt(text)` followed by ` <label name>` as the target.

Training minimises the LM loss on the label tokens only; evaluation picks the label whose tokens the model finds
most likely (accuracy) and reports their mean negative log-likelihood (`--task classification`). Sources: as every
task's, through `tables.load_table`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_dynrank.errors import UserInputError
from ds_dynrank.task import assets
from ds_dynrank.task.tables import EVAL_FRACTION, SPLIT_SEED, load_table, split_table

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"
DEFAULT_DATASET_TEMPLATE = "Review: {text}\nSentiment:"
UNCERTAINTY_TEMPLATE = "Sentence: {text}\nIs this statement certain or uncertain? Answer:"
IGNORE = -100


@dataclass
class TaskData:
    """Tokenised splits plus the label vocabulary. Examples hold `prompt_ids` and `label` (an index)."""

    train: list[dict]
    eval: list[dict]
    label_names: list[str]
    candidate_ids: list[list[int]]
    pad_id: int
    dropped: int = 0  # rows with an empty text or label, under bad_rows="drop"


def task_template(dataset: str | None) -> str:
    """The prompt a dataset gets when --prompt_template is not given: the built-in tasks have their own."""
    if dataset in (None, "", "default", assets.DEFAULT_DATASET):
        return DEFAULT_DATASET_TEMPLATE
    return {assets.UNCERTAINTY_DATASET: UNCERTAINTY_TEMPLATE}.get(dataset, DEFAULT_TEMPLATE)


def _check_columns(split, text_column: str, label_column: str) -> None:
    for flag, column in (("--text_column", text_column), ("--label_column", label_column)):
        if column not in split.column_names:
            raise UserInputError(
                f"{flag}: column {column!r} not in the dataset (its columns: {', '.join(split.column_names)})"
            )


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def usable_rows(table, text_column: str, label_column: str, bad_rows: str, name: str | None):
    """Every split without rows whose text or label is empty (or, for a ClassLabel, missing): refused naming the
    first such row as in the file (1-based), unless `bad_rows == "drop"`. Returns (table, rows dropped). An empty
    label must never become a class of its own."""
    dropped = 0
    for split_name in list(table):
        split = table[split_name]
        _check_columns(split, text_column, label_column)
        classes = hasattr(split.features[label_column], "names")
        bad = [
            i
            for i, (text, label) in enumerate(zip(split[text_column], split[label_column]))
            if _blank(text) or (label is None or label == -1 if classes else _blank(label))
        ]
        if not bad:
            continue
        if bad_rows != "drop":
            first = split[bad[0]]
            field = text_column if _blank(first[text_column]) else label_column
            where = name if len(table) == 1 else f"{name} ({split_name} split)"
            raise UserInputError(
                f"--dataset {where}: row {bad[0] + 1}, field {field!r} is empty ({len(bad)} row(s) have an empty "
                f"{text_column!r} or {label_column!r}); fix them, or pass --bad_rows drop to leave them out"
            )
        keep = sorted(set(range(len(split))) - set(bad))
        table[split_name], dropped = split.select(keep), dropped + len(bad)
    return table, dropped


def label_vocabulary(split, label_column: str) -> list[str]:
    """ClassLabel names if the dataset has them, else the sorted distinct values as strings."""
    feature = split.features[label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({str(v) for v in split[label_column]})


def _label_index(value, names: list[str]) -> int:
    if isinstance(value, int) and len(names) > value >= 0 and str(value) not in names:
        return value  # ClassLabel integer
    return names.index(str(value))


def build_task(
    tokenizer,
    dataset: str | None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    template: str | None = None,
    max_length: int = 96,
    eval_fraction: float = EVAL_FRACTION,
    max_eval_samples: int | None = None,
    split_seed: int = SPLIT_SEED,
    bad_rows: str = "refuse",
) -> TaskData:
    """Load, check and tokenise. Every problem is a UserInputError raised before any training."""
    template = template or task_template(dataset)
    if template.count("{text}") != 1:
        raise UserInputError("--prompt_template: must contain the placeholder {text} once")
    table, dropped = usable_rows(load_table(dataset), text_column, label_column, bad_rows, dataset or "default")
    train, held_out = split_table(table, eval_fraction=eval_fraction, split_seed=split_seed)
    names = label_vocabulary(train, label_column)
    if len(names) < 2:
        raise UserInputError(f"--label_column: {label_column!r} holds {len(names)} distinct value(s); need >= 2")
    candidates = [tokenizer(" " + n, add_special_tokens=False)["input_ids"] for n in names]
    suffix_ids = tokenizer(template.split("{text}", 1)[1], add_special_tokens=False)["input_ids"]
    budget = max_length - max(len(c) for c in candidates)
    if budget <= len(suffix_ids) + 1:
        raise UserInputError(f"--max_length: {max_length} leaves no room for the text (labels and template need more)")

    head, tail = template.split("{text}", 1)

    def encode(split) -> list[dict]:
        """The template's ending is tokenised on its own, so every prompt ends with the same question tokens, and
        a long text is cut before it rather than losing it."""
        out = []
        for text, label in zip(split[text_column], split[label_column]):
            ids = tokenizer(head + str(text))["input_ids"][: budget - len(suffix_ids)] + suffix_ids
            out.append({"prompt_ids": ids, "label": _label_index(label, names)})
        return out

    if max_eval_samples is not None and len(held_out) > max_eval_samples:
        held_out = held_out.select(range(max_eval_samples))
    return TaskData(encode(train), encode(held_out), names, candidates, tokenizer.pad_token_id, dropped)


def collate_train(examples: list[dict], candidate_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + label tokens; loss only on the label tokens."""
    seqs = [(e["prompt_ids"], candidate_ids[e["label"]]) for e in examples]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard_for_rank(n: int, rank: int, world: int) -> tuple[list[int], list[float]]:
    """Indices this rank evaluates and their weights (0 for padding): every rank runs the same number of batches,
    which ZeRO-3 needs because its forwards are collectives."""
    own = list(range(rank, n, world))
    per_rank = -(-n // world)
    pad = per_rank - len(own)
    return own + [own[0] if own else 0] * pad, [1.0] * len(own) + [0.0] * pad
