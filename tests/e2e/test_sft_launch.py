"""SFT through the main job with 2 processes: on the default school-math data (the generator's files) the job
reports held-out loss, perplexity, token accuracy and exact match before and after, writes them to metrics.json,
eval_history and TensorBoard (with tokens, grad norm, the live-rank histogram and the rank heatmap at events), and
its adapter states what serving it takes; every method trains on SFT batches, packed or not, under ZeRO 0-3."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from helpers import REPO, subprocess_env, two_processes

TRAIN = str(REPO / "launch" / "train.py")
METRICS = ("eval_loss", "perplexity", "token_accuracy", "exact_match")


def _config(tmp_path, name: str, **dynrank) -> str:
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    for key, value in dynrank.items():
        cfg["dynrank"][key] = {**cfg["dynrank"].get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _run(cfg: str, model, out, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "--deepspeed",
        cfg,
        "--model",
        str(model),
        "--max_steps",
        "8",
        "--eval_samples",
        "16",
        "--output_dir",
        str(out),
    ]
    cmd = [*two_processes(), TRAIN, *args, *extra]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"STDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result


def _tensorboard(out) -> tuple[set[str], set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in out.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]), set(tags["images"]), set(tags["histograms"])


@pytest.mark.e2e
def test_sft_default_data_reports_loss_perplexity_and_exact_match(tiny_chat_model_dir, tmp_path):
    cfg = _config(tmp_path, "zero2_l1ra.json", schedule={"interval": 2}, l1ra={"l1_lambda": 4.0, "gate_lr": 0.05})
    out = tmp_path / "run"
    result = _run(cfg, tiny_chat_model_dir, out, "--dataset", "school-math", "--eval_generate", "8",
                  "--max_new_tokens", "4", "--eval_interval", "4")  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("eval loss"))
    assert all(words in line for words in ("perplexity", "token accuracy", "exact match", " -> ", "after 8 steps"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sft" and metrics["metric"] == "exact_match" and metrics["eval_examples"] == 16
    assert set(METRICS) <= set(metrics) and set(metrics["baseline"]) == set(METRICS)
    assert [h["step"] for h in metrics["eval_history"]] == [0, 4, 8]
    assert all(set(METRICS) <= set(h) for h in metrics["eval_history"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    assert metrics["eval_loss"] < metrics["baseline"]["eval_loss"]  # 8 steps of SFT move the held-out loss
    assert metrics["tokens"] > 8 * 2 * 4 * 20  # 8 steps x 2 ranks x 4 examples of about 40 tokens
    answers = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]  # from both ranks
    assert [a["index"] for a in answers] == list(range(8)) and all(a["answer"] and a["prompt"] for a in answers)
    assert sum(a["correct"] for a in answers) / 8 == metrics["exact_match"]
    scalars, images, histograms = _tensorboard(out)
    assert {f"Eval/{k}" for k in ("loss", "perplexity", "token_accuracy", "exact_match")} <= scalars
    assert {"Train/Samples/tokens_seen", "Train/Samples/tokens_per_sec", "Train/Samples/grad_norm"} <= scalars
    assert "DynRank/rank_heatmap" in images and "DynRank/live_ranks" in histograms
    serving = json.loads((out / "adapter" / "dynrank_serving.json").read_text())
    ranks = json.loads((out / "allocation.json").read_text())
    assert serving["max_module_rank"] == max(ranks.values()) and serving == metrics["serving"]
    assert serving["vllm_max_lora_rank"] == min(r for r in (8, 16, 32, 64) if r >= max(ranks.values()))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("name", "dynrank", "extra"),
    [
        ("zero2_alora.json", {"schedule": {"start": 3, "interval": 3}, "alora": {"val_samples": 4}}, ["--packing"]),
        # and exact match decoded under ZeRO-3, where every generation step gathers the weights on every rank, and
        # activation checkpointing through the rebuilt engines (tests/zero/test_recompute_engine.py: exact)
        (
            "zero3_modalloc.json",
            {"schedule": {"interval": 3}},
            ["--packing", "--eval_generate", "6", "--max_new_tokens", "3", "--gradient_checkpointing"],
        ),
        ("zero2_adalora.json", {"adalora": {"tinit": 2, "tfinal": 2, "delta_t": 2}}, []),
    ],
    ids=["alora-zero2-packed", "modalloc-physical-zero3-packed-checkpointed", "adalora-zero2"],
)
def test_every_method_trains_on_sft_batches(tiny_chat_model_dir, tiny_sft_jsonl, tmp_path, name, dynrank, extra):
    out = tmp_path / "run"
    _run(_config(tmp_path, name, target_modules="all-linear", **dynrank), tiny_chat_model_dir, out, "--dataset",
         str(tiny_sft_jsonl), "--max_length", "128", *extra)  # fmt: skip
    history = json.loads((out / "allocation_history.json").read_text())
    moved = [h for h in history[1:] if h["slots_changed"] or h.get("active") != history[0].get("active")]
    assert moved, f"{name}: no event changed anything"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sft"
    assert metrics["metric"] == ("exact_match" if "--eval_generate" in extra else "eval_loss")  # a user file: asked
    assert (out / "predictions.jsonl").is_file() == ("--eval_generate" in extra)  # ZeRO-3's, gathered too
    budgets, modules = [h["budget"] for h in history], 14  # the tiny Llama: 2 layers x 7 linear modules
    if name == "zero2_alora.json":  # the shipped config, its schedule shortened: rounds at 3 and 6 of 8 steps
        assert [h["step"] for h in history] == [0, 3, 6] and metrics["reallocation_events"] == 2
        assert history[-1]["ranks"] != history[0]["ranks"] and max(budgets) <= budgets[0]
    if name == "zero2_adalora.json":  # r 12 down to target_r 8 along the cubic schedule, never back up
        assert budgets[0] == modules * 12 and budgets[-1] == modules * 8, budgets
        assert all(a >= b for a, b in zip(budgets, budgets[1:]))
