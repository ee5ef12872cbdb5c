"""An SFT dataset made ready for the job: loaded, its format detected and checked row by row, tokenised with exact
masks, fitted to --max_length, and its held-out split kept for loss, perplexity and exact match."""

from __future__ import annotations

from dataclasses import dataclass

from ds_dynrank.errors import UserInputError
from ds_dynrank.task import assets
from ds_dynrank.task.sft import (
    FORMATS,
    Example,
    check_chat_template,
    check_formats,
    detect_format,
    encode_rows,
    load_chat_template,
)
from ds_dynrank.task.tables import EVAL_FRACTION, SPLIT_SEED, load_table

DEFAULT_GENERATE = {assets.MATH_DATASET: 64}  # exact-match questions for datasets with short exact answers


@dataclass
class SFTData:
    """Tokenised splits: `train` and `eval` examples, `generate` the held-out examples exact match decodes."""

    train: list[Example]
    eval: list[Example]
    generate: list[Example]
    format: str
    pad_id: int
    eos_id: int
    cut: int = 0
    dropped: int = 0


def _source(name: str, split: str, splits: int) -> str:
    """How an error names the rows: the file (or dataset) alone when it is one split, else with the split."""
    return name if splits == 1 else f"{name} ({split} split)"


def _eval_split_name(table) -> str | None:
    return next((n for n in ("test", "validation", "valid", "dev") if n in table and n != next(iter(table))), None)


def build_sft(tokenizer, dataset: str | None, *, fmt: str = "auto", max_length: int = 256, truncation: str = "cut",
              eval_samples: int | None = None, generate: int | None = None,
              chat_template: str | None = None) -> SFTData:  # fmt: skip
    """Load, check and tokenise; every problem is a UserInputError naming the file, row (as in the file) and field.
    The held-out split is the dataset's own test/validation split, or a fixed-seed quarter of its rows."""
    import torch

    if fmt != "auto" and fmt not in FORMATS:
        raise UserInputError(f"--format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    name = dataset or assets.MATH_DATASET
    table = load_table(name)
    train_name = "train" if "train" in table else next(iter(table))
    eval_name = _eval_split_name(table)
    fmt = detect_format(table[train_name].column_names, name) if fmt == "auto" else fmt
    load_chat_template(tokenizer, chat_template)
    check_chat_template(tokenizer, fmt)
    encoded = {}
    for split_name in (train_name, eval_name) if eval_name else (train_name,):
        rows, source = table[split_name].to_list(), _source(name, split_name, len(table))
        check_formats(rows, fmt, source)
        encoded[split_name] = encode_rows(tokenizer, rows, fmt, source, max_length=max_length, truncation=truncation)
    train = encoded[train_name].examples
    if eval_name:
        held_out = encoded[eval_name].examples
    else:  # a fixed quarter of the rows, the same whatever the run's seed
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        n_eval = max(1, round(EVAL_FRACTION * len(train)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in sorted(order[n_eval:])]
    # a fixed mix: files are often grouped (by module, by source)
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held_out = [held_out[i] for i in order[: eval_samples or None]]
    n_generate = DEFAULT_GENERATE.get(name, 0) if generate is None else generate
    return SFTData(
        train=train,
        eval=held_out,
        generate=[e for e in held_out if e.prompt_ids and e.answer][:n_generate],
        format=fmt,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_id=tokenizer.eos_token_id,
        cut=sum(e.cut for e in encoded.values()),
        dropped=sum(e.dropped for e in encoded.values()),
    )
