"""Datasets load from local files and directories through `datasets`; bad columns are clear errors; the LM framing
puts the loss on the label tokens only; eval shards are equal-sized and the scoring paths agree."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import sentences, tiny_llama

from ds_dynrank.errors import UserInputError
from ds_dynrank.task.classification import IGNORE, build_task, collate_train, shard_for_rank
from ds_dynrank.task.evaluation import candidate_logprobs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_csv_json_parquet_and_saved_dir_give_the_same_task(tokenizer, tiny_csv, tmp_path):
    import datasets

    rows = sentences(96)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
    table = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    tasks = [
        build_task(tokenizer, str(p), max_length=48)
        for p in (tiny_csv, tmp_path / "d.jsonl", tmp_path / "d.parquet", tmp_path / "saved")
    ]
    for task in tasks:
        assert task.label_names == ["negative", "positive"]
        assert len(task.train) == 72 and len(task.eval) == 24
        assert task.train == tasks[0].train and task.eval == tasks[0].eval


def test_class_label_names_and_own_test_split(tokenizer, tmp_path):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["bad", "good"])}
    )
    rows = {"sentence": [t for t, _ in sentences(40)], "y": [int(y == "positive") for _, y in sentences(40)]}
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows, features=features),
        test=datasets.Dataset.from_dict({k: v[:10] for k, v in rows.items()}, features=features),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    task = build_task(tokenizer, str(tmp_path / "dd"), text_column="sentence", label_column="y", max_eval_samples=6)
    assert task.label_names == ["bad", "good"]
    assert len(task.train) == 40 and len(task.eval) == 6
    assert [e["label"] for e in task.eval] == rows["y"][:6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(text_column="review"), r"--text_column: column 'review' not in the dataset \(its columns: text, label\)"),
        (dict(label_column="stars"), r"--label_column: column 'stars' not in the dataset"),
        (dict(template="no placeholder"), r"--prompt_template: must contain the placeholder \{text\} once"),
        (dict(template="{text} {text}"), r"--prompt_template: must contain the placeholder \{text\} once"),
        (dict(max_length=3), r"--max_length: 3 leaves no room"),
    ],
)
def test_bad_columns_and_options(tokenizer, tiny_csv, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        build_task(tokenizer, str(tiny_csv), **kwargs)


def test_missing_paths(tokenizer, tmp_path):
    with pytest.raises(UserInputError, match="--dataset: local path not found: /nonexistent/x.csv"):
        build_task(tokenizer, "/nonexistent/x.csv")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserInputError, match="must end in one of"):
        build_task(tokenizer, str(tmp_path / "x.txt"))


def test_truncation_keeps_the_question(tokenizer, tiny_csv):
    full = build_task(tokenizer, str(tiny_csv), max_length=96)
    task = build_task(tokenizer, str(tiny_csv), max_length=10)
    suffix = tokenizer("\nLabel:", add_special_tokens=False)["input_ids"]
    assert max(len(e["prompt_ids"]) for e in full.train) > 10 - 1  # the cut really happens
    for e, whole in zip(task.train, full.train):
        assert len(e["prompt_ids"]) + max(len(c) for c in task.candidate_ids) <= 10
        assert e["prompt_ids"][-len(suffix) :] == suffix == whole["prompt_ids"][-len(suffix) :]
        assert e["prompt_ids"][: -len(suffix)] == whole["prompt_ids"][: len(e["prompt_ids"]) - len(suffix)]


def test_collate_puts_loss_on_label_tokens_only():
    batch = collate_train(
        [{"prompt_ids": [5, 6, 7], "label": 1}, {"prompt_ids": [5], "label": 0}],
        candidate_ids=[[9], [10, 11]],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 11], [5, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [10, 11], [IGNORE, 9] + [IGNORE] * 3]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


@pytest.mark.parametrize(("n", "world"), [(10, 2), (9, 2), (7, 3), (1, 2)])
def test_eval_shards_cover_everything_once_with_equal_lengths(n, world):
    shards = [shard_for_rank(n, r, world) for r in range(world)]
    assert len({len(idx) for idx, _ in shards}) == 1
    counted = sorted(i for idx, w in shards for i, wi in zip(idx, w) if wi == 1.0)
    assert counted == list(range(n))


def test_single_token_fast_path_equals_full_scoring():
    model = tiny_llama(seed=4).eval()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    fast = candidate_logprobs(model, prompts, [[20], [21], [22]], pad_id=0, device="cpu")
    padded = [[20, 0], [21, 0], [22, 0]]  # same candidates scored through the multi-token path
    with torch.no_grad():
        full = candidate_logprobs(model, prompts, [[20, 1], [21, 1], [22, 1]], pad_id=0, device="cpu")
        tail = candidate_logprobs(model, [p + [c[0]] for p in prompts for c in padded], [[1]], 0, "cpu")
    torch.testing.assert_close(full, fast + tail.view(3, 3), rtol=1e-5, atol=1e-5)


def test_second_benchmark_task_loads_by_name(tokenizer):
    """`--dataset wiki-uncertainty`: the CoNLL-2010 Wikipedia uncertainty sentences, built offline by
    `python -m ds_dynrank prepare` (launch/setup.sh), with their own prompt."""
    from ds_dynrank.task import assets

    csv_path = assets.uncertainty_dataset_csv()
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "text,label" and len(lines) > 3000
    task = build_task(tokenizer, "wiki-uncertainty", max_length=64)
    assert task.label_names == ["certain", "uncertain"]
    assert len(task.train) == 2250 and len(task.eval) == 750  # the fixed-seed 3:1 split
    question = tokenizer("\nIs this statement certain or uncertain? Answer:", add_special_tokens=False)["input_ids"]
    assert task.train[0]["prompt_ids"][-len(question) :] == question


def test_empty_texts_and_labels_are_refused_by_row_or_dropped_and_counted(tokenizer, tmp_path):
    """An empty label used to become a third class (accuracy 0 on those rows); now the first bad row is named."""
    import csv

    rows = sentences(40)
    rows[6] = ("", "positive")  # data row 7: no text
    rows[12] = ("the film was fine .", "")  # data row 13: no label
    path = tmp_path / "gaps.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    with pytest.raises(UserInputError, match=rf"--dataset {path}: row 7, field 'text' is empty \(2 row\(s\)"):
        build_task(tokenizer, str(path), max_length=48)
    task = build_task(tokenizer, str(path), max_length=48, bad_rows="drop")
    assert task.dropped == 2 and task.label_names == ["negative", "positive"]
    assert len(task.train) + len(task.eval) == 38
