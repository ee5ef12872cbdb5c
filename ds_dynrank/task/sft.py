"""Supervised fine-tuning data in TRL's conventions, tokenised with exact loss masks.

Formats, detected from the columns (or forced with --format):
- `messages`: a conversation of {role, content}, rendered with the model's chat template; loss on every assistant
  turn (its content and its end-of-turn token) and nowhere else;
- `prompt`/`completion`: loss on the completion only (plain strings, or conversations as TRL accepts them);
- `text`: loss everywhere;
- import formats: alpaca (`instruction`, optional `input`, `output`) and sharegpt (`conversations` of
  {from, value}), both turned into `messages`.

Masks never look at token ids: padding is masked by position (SmolLM2's pad token is its end-of-turn token, which
must be trained on), and assistant spans come from the templated prefix, since transformers' assistant mask is
empty for templates without generation markers. Every problem is a UserInputError naming the file, row and field,
raised before training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_dynrank.errors import UserInputError

IGNORE = -100
FORMATS = ("messages", "prompt-completion", "text", "alpaca", "sharegpt")
# the columns that identify each format, in the order detection tries them
SIGNATURES = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenised example: `labels` is -100 where no loss falls. `prompt_ids`/`answer` (the conversation up to
    its last answer, and that answer) serve exact-match generation."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    answer: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Encoded:
    """What encoding a split left: its examples and how many were cut or dropped for --max_length."""

    examples: list[Example]
    cut: int = 0
    dropped: int = 0


def _where(source: str, index: int, column: str | None = None) -> str:
    """Where a problem is, for the user: rows counted from 1, as a line of a JSONL file."""
    return f"{source}: row {index + 1}" + (f", field {column!r}" if column else "")


def detect_format(columns: Iterable[str], source: str) -> str:
    """The format whose columns the dataset has (the first in SIGNATURES order that matches)."""
    columns = set(columns)
    for fmt, needed in SIGNATURES.items():
        if set(needed) <= columns:
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(c)}" for fmt, c in SIGNATURES.items())
    raise UserInputError(
        f"{source}: no SFT format matches its columns ({', '.join(sorted(columns))}); expected one of {expected} "
        "(or --task classification for text and label columns)"
    )


def row_format(row: dict) -> str | None:
    """Which format this one row fills in (None: none): files whose rows disagree are refused."""
    for fmt, needed in SIGNATURES.items():
        if all(row.get(c) not in (None, "") for c in needed):
            return fmt
    return None


def check_formats(rows: Sequence[dict], fmt: str, source: str) -> None:
    """Every row fills in `fmt`'s fields, and no row is in another format (a mixed file)."""
    for i, row in enumerate(rows):
        found = row_format(row)
        if found == fmt:
            continue
        if found is not None:
            raise UserInputError(
                f"{_where(source, i)}: is in format {found!r}, but the file is {fmt!r} (mixed formats)"
            )
        missing = [c for c in SIGNATURES[fmt] if row.get(c) in (None, "")]
        what = "empty" if fmt == "prompt-completion" and "completion" in missing else "missing or empty"
        raise UserInputError(f"{_where(source, i, missing[0])}: {what} (format {fmt!r})")


def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    """The conversation of an alpaca, sharegpt or messages row, checked."""
    if fmt == "alpaca":
        user = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]
    elif fmt == "sharegpt":
        messages = []
        for turn in row["conversations"]:
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise UserInputError(f"{where}, field 'conversations': each turn needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise UserInputError(
                    f"{where}, field 'conversations': unknown role {turn['from']!r} "
                    f"(known: {', '.join(SHAREGPT_ROLES)})"
                )
            messages.append({"role": role, "content": turn["value"]})
    else:
        messages = row["messages"]
    check_conversation(messages, where)
    return messages


def check_conversation(messages, where: str) -> None:
    """Roles known and in order (an optional system message first, then user and assistant taking turns), at
    least one assistant turn, every content a non-empty string."""
    if not isinstance(messages, list) or not messages:
        raise UserInputError(f"{where}: a conversation must be a non-empty list of messages")
    expected = "user"
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserInputError(f"{where}, message {k}: needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise UserInputError(f"{where}, message {k}: unknown role {role!r} (known: {', '.join(CHAT_ROLES)})")
        if role == "system" and k == 0:
            continue
        if role != expected:
            raise UserInputError(
                f"{where}, message {k}: role {role!r} out of order (expected {expected!r}: an optional system "
                "message first, then user and assistant taking turns)"
            )
        if not isinstance(content, str) or not content.strip():
            raise UserInputError(f"{where}, message {k}: empty {role} content")
        expected = "assistant" if role == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise UserInputError(f"{where}: the conversation has no assistant turn (nothing to train on)")


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def template_ids(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))


def _turn_end(ids: list[int], start: int, end: int, eos: int | None) -> int:
    """The end of an assistant span: just after its last end-of-turn token (what the template writes after it,
    such as a newline, is scaffolding), or `end` when the span has none."""
    for t in range(end - 1, start - 1, -1):
        if ids[t] == eos:
            return t + 1
    return end


def encode_conversation(tokenizer, messages: list[dict], where: str) -> Example:
    """Chat-templated ids with labels on every assistant turn: the span between the templated prefix that asks for
    the turn (`add_generation_prompt=True`) and the templated conversation through the turn."""
    full = template_ids(tokenizer, messages)
    labels = [IGNORE] * len(full)
    prompt_ids: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = template_ids(tokenizer, messages[:k], generation_prompt=True)
        through = template_ids(tokenizer, messages[: k + 1])
        if full[: len(prefix)] != prefix or full[: len(through)] != through:
            raise UserInputError(
                f"{where}: the chat template does not render the conversation's beginning as a prefix of the whole, "
                "so assistant turns cannot be masked exactly (use prompt/completion, or --chat_template FILE)"
            )
        end = _turn_end(full, len(prefix), len(through), tokenizer.eos_token_id)
        labels[len(prefix) : end] = full[len(prefix) : end]
        prompt_ids = prefix
    last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return Example(full, labels, prompt_ids, last)


def encode_row(tokenizer, row: dict, fmt: str, where: str) -> Example:
    """One row of a checked format as ids and exact labels."""
    eos = tokenizer.eos_token_id
    if fmt in ("messages", "alpaca", "sharegpt"):
        return encode_conversation(tokenizer, to_messages(row, fmt, where), where)
    if fmt == "text":
        ids = _ids(tokenizer(str(row["text"]))) + [eos]
        return Example(ids, list(ids))
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion (TRL)
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise UserInputError(f"{where}: 'prompt' and 'completion' must both be strings or both conversations")
        example = encode_conversation(tokenizer, prompt + completion, where)
        start = len(template_ids(tokenizer, prompt, generation_prompt=True))
        example.labels[:start] = [IGNORE] * start  # loss on the completion only, even if the prompt has answers
        return example
    prompt_ids = _ids(tokenizer(str(prompt)))
    completion_ids = _ids(tokenizer(str(completion), add_special_tokens=False)) + [eos]
    ids = prompt_ids + completion_ids
    return Example(ids, [IGNORE] * len(prompt_ids) + completion_ids, prompt_ids, str(completion))


def fit(example: Example, max_length: int, truncation: str) -> Example | None:
    """An example no longer than `max_length`, or None (dropped). `cut` drops tokens from the beginning so every
    labelled token stays (a text example, labelled everywhere, keeps its beginning instead); an example whose
    labelled part alone is too long cannot be cut without losing its answer and is dropped."""
    if len(example) <= max_length:
        return example
    if truncation == "drop":
        return None
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE]
    if labelled and len(labelled) == len(example):  # text: keep the beginning, as TRL does
        return Example(example.input_ids[:max_length], example.labels[:max_length])
    start = len(example) - max_length
    if not labelled or labelled[0] < start:
        return None
    cut_prompt = example.prompt_ids[start:] if len(example.prompt_ids) > start else []
    return Example(example.input_ids[start:], example.labels[start:], cut_prompt, example.answer)


def encode_rows(tokenizer, rows: Sequence[dict], fmt: str, source: str, *, max_length: int, truncation: str) -> Encoded:
    """Every row encoded and fitted to `max_length`; an error when nothing fits."""
    out = Encoded([])
    for i, row in enumerate(rows):
        example = encode_row(tokenizer, row, fmt, _where(source, i))
        if not any(label != IGNORE for label in example.labels):
            raise UserInputError(f"{_where(source, i)}: nothing to train on (no labelled token)")
        fitted = fit(example, max_length, truncation)
        if fitted is None:
            out.dropped += 1
        else:
            out.cut += int(len(fitted) < len(example))
            out.examples.append(fitted)
    if not out.examples:
        raise UserInputError(f"{source}: every example is longer than --max_length {max_length} tokens")
    return out


def load_chat_template(tokenizer, path: str | None) -> None:
    """Give the tokenizer the template in `path` (a Jinja file), for models that ship none."""
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserInputError(f"--chat_template: file not found: {file}")
    tokenizer.chat_template = file.read_text()


def check_chat_template(tokenizer, fmt: str) -> None:
    if fmt in ("messages", "alpaca", "sharegpt") and not getattr(tokenizer, "chat_template", None):
        raise UserInputError(
            f"--format: {fmt!r} rows are rendered with the model's chat template, and this tokenizer has none; "
            "give one with --chat_template FILE, or use prompt/completion or text rows"
        )


# ----------------------------------------------------------------------------------------------- batches


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Best-fit decreasing: the longest example first, each into the row with the least room that still fits it
    (a new row when none does). Rows hold at most `max_length` tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        fits = [r for r in range(len(rows)) if room[r] >= len(example)]
        if fits:
            best = min(fits, key=lambda r: (room[r], r))
            rows[best].append(example)
            room[best] -= len(example)
        else:
            rows.append([example])
            room.append(max_length - len(example))
    return rows


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded examples; the mask and the ignored labels come from the lengths, never from token ids."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: examples back to back with position ids restarting at each, and no attention mask, so the
    model's causal mask keeps every example to itself (transformers builds it from the position ids). Each
    example's first label is ignored: it would be predicted from the previous example's last token. `num_tokens`
    counts the examples' tokens (the loop takes it out before the forward)."""
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            ids[i, at : at + n] = torch.tensor(e.input_ids)
            labels[i, at + 1 : at + n] = torch.tensor(e.labels[1:])
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)  # the padding: one more sequence of its own, unlabelled
    tokens = torch.tensor(sum(len(e) for row in rows for e in row))
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "num_tokens": tokens}
