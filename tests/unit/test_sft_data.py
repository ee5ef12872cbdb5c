"""SFT data on a tiny chat tokenizer (ChatML, pad = eos = <|im_end|>, like SmolLM2): exact label masks for every
format, single and multi-turn; padding masked by position; truncation that keeps the answer; packing in which no
example sees another's tokens (logits equal to the unpacked forward); loss, perplexity, token accuracy and exact
match against hand computation; and every bad input refused in one line naming the file, row and field."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import CHATML, math_messages, write_jsonl

from ds_dynrank.errors import UserInputError
from ds_dynrank.task.sft import (
    IGNORE,
    Example,
    check_formats,
    collate,
    collate_packed,
    detect_format,
    encode_row,
    encode_rows,
    fit,
    pack,
)
from ds_dynrank.task.sft_eval import evaluate_loss, exact_match, greedy_answers, token_sums
from ds_dynrank.task.sft_task import build_sft


@pytest.fixture(scope="module")
def tok(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def labelled(tok, example: Example) -> str:
    """The text of the labelled tokens, in order."""
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def spans(example: Example) -> list[tuple[int, int]]:
    out, start = [], None
    for i, label in enumerate([*example.labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def test_single_turn_messages_train_on_the_answer_and_its_end_of_turn_only(tok):
    row = math_messages(1)[0]
    e = encode_row(tok, row, "messages", "f: row 1")
    assert e.input_ids == tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
    assert labelled(tok, e) == "5<|im_end|>"  # the closing <|im_end|> (= pad) is trained; the newline after is not
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos and e.input_ids.count(eos) == 3 and sum(label == eos for label in e.labels) == 1
    assert tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n") and e.answer == "5"


def test_multi_turn_messages_train_on_every_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "What is 7 times 6?"},
        {"role": "assistant", "content": "42"},
    ]
    e = encode_row(tok, {"messages": messages}, "messages", "f: row 1")
    assert [tok.decode(e.input_ids[a:b]) for a, b in spans(e)] == ["5<|im_end|>", "42<|im_end|>"]
    assert e.answer == "42" and tok.decode(e.prompt_ids).count("<|im_start|>assistant") == 2


def test_prompt_completion_text_alpaca_and_sharegpt(tok):
    eos = tok.eos_token_id
    e = encode_row(tok, {"prompt": "Q: 2+3=", "completion": " 5"}, "prompt-completion", "f")
    assert labelled(tok, e) == " 5<|im_end|>" and e.input_ids[-1] == eos  # TRL appends eos to the completion
    assert tok.decode(e.input_ids[: len(e.prompt_ids)]) == "Q: 2+3=" and e.answer == " 5"
    conversational = {"prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
                      "completion": [{"role": "assistant", "content": "5"}]}  # fmt: skip
    assert labelled(tok, encode_row(tok, conversational, "prompt-completion", "f")) == "5<|im_end|>"
    t = encode_row(tok, {"text": "the film was great"}, "text", "f")
    assert t.labels == t.input_ids and t.input_ids[-1] == eos  # loss everywhere
    alpaca = encode_row(tok, {"instruction": "What is 2 plus 3?", "input": "", "output": "5"}, "alpaca", "f")
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    assert alpaca.input_ids == encode_row(tok, {"messages": messages}, "messages", "f").input_ids
    with_input = encode_row(tok, {"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca", "f")
    assert "Add.\n\n2 and 3" in tok.decode(with_input.input_ids)
    share = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]}
    assert encode_row(tok, share, "sharegpt", "f").input_ids == alpaca.input_ids


def test_formats_are_detected_from_the_columns():
    assert detect_format(["messages", "id"], "f") == "messages"
    assert detect_format(["conversations"], "f") == "sharegpt"
    assert detect_format(["prompt", "completion"], "f") == "prompt-completion"
    assert detect_format(["instruction", "input", "output"], "f") == "alpaca"
    assert detect_format(["text"], "f") == "text"
    with pytest.raises(UserInputError, match=r"f: no SFT format matches its columns \(question\)"):
        detect_format(["question"], "f")


def test_padding_is_masked_by_position_never_by_token_id(tok):
    short, long = (encode_row(tok, row, "messages", "f") for row in math_messages(2))
    batch = collate([short, long], tok.pad_token_id)
    n = len(short)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][0, :n].tolist() == short.labels  # its <|im_end|> label (= the pad id) kept
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_an_overlong_example_is_cut_before_its_answer_or_dropped(tok):
    e = encode_row(
        tok, {"prompt": "the film was great and the cast too " * 6, "completion": " 5"}, "prompt-completion", "f"
    )
    cut = fit(e, 12, "cut")
    assert len(cut) == 12 and labelled(tok, cut) == labelled(tok, e) and cut.input_ids == e.input_ids[-12:]
    assert fit(e, 12, "drop") is None
    answer = sum(label != IGNORE for label in e.labels)
    assert fit(e, answer - 1, "cut") is None  # the answer alone is longer: it cannot be kept, so it is dropped
    text = encode_row(tok, {"text": "the film was great " * 5}, "text", "f")
    assert fit(text, 6, "cut").input_ids == text.input_ids[:6]  # labelled everywhere: the beginning stays
    rows = [{"prompt": "q " * 40, "completion": " a"}, {"prompt": "q", "completion": " a"}]
    encoded = encode_rows(tok, rows, "prompt-completion", "f", max_length=10, truncation="drop")
    assert (len(encoded.examples), encoded.dropped, encoded.cut) == (1, 1, 0)
    with pytest.raises(UserInputError, match=r"f: every example is longer than --max_length 1 tokens"):
        encode_rows(tok, rows, "prompt-completion", "f", max_length=1, truncation="cut")  # answer + eos: 2


def test_packing_is_best_fit_decreasing_within_max_length():
    examples = [Example([0] * n, [0] * n) for n in (7, 5, 4, 3, 3, 2)]
    rows = pack(examples, 10)
    assert [[len(e) for e in row] for row in rows] == [[7, 3], [5, 4], [3, 2]]
    assert all(sum(len(e) for e in row) <= 10 for row in rows)


def test_packed_examples_never_see_each_other(tok, tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    model.config.use_cache = False  # as the job loads it: with a cache, transformers does not read packed positions
    examples = [encode_row(tok, row, "messages", "f") for row in math_messages(3)]
    batch = collate_packed([examples], tok.pad_token_id)
    assert batch.pop("num_tokens") == sum(len(e) for e in examples)
    at = 0
    for e in examples:  # positions restart; each example's first label is ignored (no look across the seam)
        assert batch["position_ids"][0, at : at + len(e)].tolist() == list(range(len(e)))
        assert batch["labels"][0, at] == IGNORE and batch["labels"][0, at + 1 : at + len(e)].tolist() == e.labels[1:]
        at += len(e)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        at = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert torch.allclose(packed[at : at + len(e)], alone, atol=1e-5), "an example saw its neighbours"
            at += len(e)
        loss_packed = model(**batch).loss
        loss_plain = model(**collate(examples, tok.pad_token_id)).loss
    assert loss_packed.item() == pytest.approx(loss_plain.item(), rel=1e-5)  # the same tokens, the same loss


def test_loss_perplexity_and_token_accuracy_by_hand(tok):
    logits = torch.log_softmax(torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]]), -1)
    labels = torch.tensor([[IGNORE, 1, 0]])  # predict token 1 from position 0, token 0 from position 1
    sums = token_sums(logits, labels)[0].tolist()
    nll = -logits[0, 0, 1].item() - logits[0, 1, 0].item()
    assert sums == pytest.approx([nll, 2, 0])  # argmax at 0 is token 0 (wrong), at 1 token 1 (wrong)
    examples = [Example([5, 6, 7], [IGNORE, 6, 7]), Example([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])]
    fixed = torch.log_softmax(torch.randn(1, 4, 10, generator=torch.Generator().manual_seed(0)), -1)

    def forward(input_ids, attention_mask):
        return SimpleNamespace(logits=fixed.expand(input_ids.shape[0], -1, -1)[:, : input_ids.shape[1]])

    result = evaluate_loss(forward, examples, batch_size=1, pad_id=0, device="cpu")
    by_hand = [-fixed[0, 0, 6], -fixed[0, 1, 7], -fixed[0, 1, 7], -fixed[0, 2, 8]]  # 4 labelled tokens in all
    loss = float(sum(by_hand)) / 4
    right = sum(int(fixed[0, p].argmax() == t) for p, t in ((0, 6), (1, 7), (1, 7), (2, 8)))
    assert result["eval_loss"] == pytest.approx(loss) and result["perplexity"] == pytest.approx(math.exp(loss))
    assert result["token_accuracy"] == pytest.approx(right / 4)


def test_exact_match_decodes_greedy_answers_up_to_the_end_of_turn():
    eos = 2
    answers = {(7,): [4, 5, eos, 9], (8,): [4, eos, 9, 9], (9,): [6, 6, 6, 6]}  # new tokens per prompt

    class Model:
        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            assert kw["do_sample"] is False and (attention_mask[:, -1] == 1).all()  # left padded
            new = torch.tensor([answers[tuple(row[attention_mask[i] == 1].tolist()[-1:])] for i, row in
                                enumerate(input_ids)])  # fmt: skip
            return torch.cat([input_ids, new[:, :max_new_tokens]], 1)

    examples = [Example([1, 7], [0, 0], [1, 7], "45"), Example([7, 8], [0, 0], [7, 8], "4 "),
                Example([9], [0], [9], "66")]  # fmt: skip
    decode = "".join  # decode(ids): the digits themselves
    answers = greedy_answers(Model(), examples, lambda ids: decode(str(i) for i in ids), batch_size=2, pad_id=0,
                             eos_id=eos, max_new_tokens=4, device="cpu", synced=False)  # fmt: skip
    assert [(a["index"], a["prompt"], a["answer"], a["generated"], a["correct"]) for a in answers] == [
        (0, "17", "45", "45", True), (1, "78", "4 ", "4", True), (2, "9", "66", "6666", False)]  # fmt: skip
    assert exact_match(answers) == pytest.approx(2 / 3)  # "45" and "4" (stripped) match; "6666" is not "66"


BAD_ROWS = [
    ([{"messages": math_messages(1)[0]["messages"]}, {"prompt": "q", "completion": "a"}],
     r"row 2: is in format 'prompt-completion', but the file is 'messages' \(mixed formats\)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"row 1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "assistant", "content": "5"}, {"role": "user", "content": "hi"}]}],
     r"row 1, message 0: role 'assistant' out of order"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
     r"row 1, message 1: role 'user' out of order"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}],
     r"row 1, message 1: unknown role 'tool'"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]}],
     r"row 1, field 'conversations': unknown role 'bard'"),
    ([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}],
     r"row 2, field 'completion': empty \(format 'prompt-completion'\)"),
]  # fmt: skip


@pytest.mark.parametrize(("rows", "message"), BAD_ROWS)
def test_bad_rows_are_refused_naming_file_row_and_field(tok, tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: {message}") as err:
        build_sft(tok, str(path), eval_samples=None)
    assert "\n" not in str(err.value)


def test_check_formats_names_the_row_of_a_missing_field():
    with pytest.raises(UserInputError, match=r"f: row 3, field 'completion': empty"):
        check_formats(
            [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c", "completion": None}], "prompt-completion", "f"
        )


def test_messages_for_a_tokenizer_without_a_chat_template(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", math_messages(8))
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(UserInputError, match=r"--format: 'messages' rows are rendered with the model's chat "):
            build_sft(tok, str(path))
        template = tmp_path / "chatml.jinja"
        template.write_text(CHATML)
        data = build_sft(tok, str(path), chat_template=str(template))  # a template file given: accepted
        assert data.format == "messages" and labelled(tok, data.train[0]).endswith("<|im_end|>")
    finally:
        tok.chat_template = saved


def test_the_math_generator_is_deterministic_and_its_answers_are_right(tmp_path):
    """Same seed, same bytes (two fresh processes, as setup builds it); held-out questions never seen in training;
    the gcd answers check out against math.gcd."""
    import json
    import subprocess
    import sys

    from helpers import subprocess_env

    files = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [
            sys.executable,
            "-m",
            "ds_dynrank.task.mathgen",
            str(out),
            "--seed",
            "3",
            "--train",
            "40",
            "--test",
            "10",
        ]
        done = subprocess.run(cmd, env=subprocess_env(PYTHONHASHSEED="0"), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        files.append({split: (out / f"{split}.jsonl").read_bytes() for split in ("train", "test")})
    assert files[0] == files[1]
    rows = {s: [json.loads(line) for line in files[0][s].decode().splitlines()] for s in ("train", "test")}
    assert len(rows["train"]) == 6 * 40 and len(rows["test"]) == 6 * 10
    question = {s: {r["messages"][1]["content"] for r in rows[s]} for s in rows}
    assert not question["train"] & question["test"]
    for row in rows["train"] + rows["test"]:
        if row["module"] == "numbers__gcd":
            a, b = map(int, re.findall(r"-?\d+", row["messages"][1]["content"])[:2])
            assert int(row["messages"][2]["content"]) == math.gcd(a, b), row


def test_sharegpt_conversations_train_on_every_assistant_turn(tok):
    """The packaged ShareGPT file (cut off mid-record) decoded record by record into multi-turn chat."""
    data = build_sft(tok, "sharegpt", max_length=4096, eval_samples=50)
    assert data.format == "sharegpt" and len(data.train) + len(data.eval) > 1000
    multi = [e for e in data.eval if len(spans(e)) > 1]
    assert multi, "no multi-turn conversation in the held-out sample"
    assert all(labelled(tok, e).count("<|im_end|>") == len(spans(e)) for e in data.eval)


def test_a_template_that_rewrites_the_beginning_is_refused(tok):
    """Masks come from the templated prefix: a template whose beginning depends on what follows (here, the number of
    messages) cannot be masked exactly, and says so."""
    saved = tok.chat_template
    tok.chat_template = "{{ messages | length }}" + CHATML
    try:
        with pytest.raises(UserInputError, match=r"f: row 1: the chat template does not render the conversation's"):
            encode_row(tok, math_messages(1)[0], "messages", "f: row 1")
    finally:
        tok.chat_template = saved


class CumulativeModel(torch.nn.Module):
    """Logits = running sum of token embeddings: restarting it at each example (reading position ids) keeps packed
    examples apart; summing over the whole row (ignoring them) lets every example see the ones before it."""

    def __init__(self, isolates: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(400, 8)
        self.isolates = isolates
        self.device = "cpu"

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.embed(input_ids)
        if self.isolates and position_ids is not None:
            starts = (position_ids == 0).cumsum(-1)  # which example each token belongs to
            out = torch.zeros_like(x)
            for seg in starts.unique():
                at = starts[0] == seg
                out[:, at] = x[:, at].cumsum(1)
            return SimpleNamespace(logits=out)
        return SimpleNamespace(logits=x.cumsum(1))

    @property
    def module(self):
        return self


def test_packing_is_refused_for_a_model_that_lets_examples_see_each_other(tok):
    from ds_dynrank.task.job import JobData, check_packing_isolation

    examples = [encode_row(tok, row, "messages", "f") for row in math_messages(4)]
    job = JobData("sft", examples, lambda b: collate(b, 0), lambda e: {}, "eval_loss", 0)
    check_packing_isolation(CumulativeModel(isolates=True), job)  # keeps them apart: accepted
    with pytest.raises(UserInputError, match=r"--packing: this model's attention does not keep packed examples"):
        check_packing_isolation(CumulativeModel(isolates=False), job)
