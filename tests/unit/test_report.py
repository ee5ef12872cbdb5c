"""`report`: figures and summary.md from a run's allocation history; the numbers in the summary are computed."""

from __future__ import annotations

import json

import pytest

from ds_dynrank.errors import UserInputError
from ds_dynrank.tools.cli import main
from ds_dynrank.tools.report import parse_module, rank_table, type_labels, type_totals, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TYPES = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def _ranks(step: int) -> dict[str, int]:
    """4 layers x 3 types; per event, attention ranks shrink by 1 and down_proj grows by 2 (layer 3 by 3)."""
    ranks = {}
    for layer in range(4):
        for t, block in TYPES.items():
            grow = (3 if layer == 3 else 2) * step if t == "down_proj" else -step
            ranks[f"model.layers.{layer}.{block}.{t}"] = 8 + grow
    return ranks


def _history(with_active: bool = False) -> list[dict]:
    events = []
    for i in range(3):
        ranks = _ranks(i)
        event = {
            "step": 10 * i,
            "ranks": ranks,
            "budget": sum(ranks.values()),
            "budget_unit": "rank",
            "slots_changed": 0 if i == 0 else 9,
            "seconds": 0.01,
        }
        if with_active:  # q_proj off from the second event on; layer 0 down_proj off at the last
            event["active"] = {n: not (n.endswith("q_proj") and i > 0) for n in ranks}
            event["active"]["model.layers.0.mlp.down_proj"] = i < 2
        events.append(event)
    return events


def _run_dir(tmp_path, history, metrics=None):
    run = tmp_path / "run"
    run.mkdir()
    (run / "allocation_history.json").write_text(json.dumps(history))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.self_attn.q_proj", (12, "q_proj")),
        ("model.layers.3.mlp.down_proj", (3, "down_proj")),
        ("transformer.h.4.attn.c_attn", (4, "c_attn")),
        ("transformer.h.0.mlp.c_fc", (0, "c_fc")),
        ("lm_head", (None, "lm_head")),
        ("model.encoder.block.2.layer.0.SelfAttention.q", (2, "q")),  # the first integer is the layer
    ],
)
def test_parse_module(name, expected):
    assert parse_module(name) == expected


def test_gpt2_c_proj_split_by_block_and_totals():
    names = [f"transformer.h.{i}.{b}" for i in range(2) for b in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]
    labels = type_labels(names)
    assert labels["transformer.h.1.attn.c_attn"] == "c_attn"
    assert (
        labels["transformer.h.0.attn.c_proj"] == "attn.c_proj" and labels["transformer.h.1.mlp.c_proj"] == "mlp.c_proj"
    )
    ranks = {n: 2 + i for i, n in enumerate(names)}  # 2..7
    assert type_totals(ranks) == {"c_attn": 2 + 5, "attn.c_proj": 3 + 6, "mlp.c_proj": 4 + 7}


def test_rank_table_final_grid_and_missing_cells():
    history = _history()
    history[-1]["ranks"]["lm_head"] = 5
    table = rank_table(history)
    assert table.types == ["q_proj", "v_proj", "down_proj", "lm_head"]
    assert table.layers == ["0", "1", "2", "3", "-"]
    assert table.values[0] == [6, 6, 6, 6, None]  # q_proj: 8 - 2
    assert table.values[2] == [12, 12, 12, 14, None]  # down_proj: 8 + 2*2, layer 3: 8 + 3*2
    assert table.values[3] == [None, None, None, None, 5]
    assert rank_table(history, event=0).values[2] == [8, 8, 8, 8, None]


def test_write_report_files_and_summary(tmp_path):
    metrics = {
        "method": "adalora",
        "value": 0.8125,
        "baseline_value": 0.5,
        "steps": 25,
        "trainable_parameters": 4000,
        "trainable_parameters_initial": 4096,
    }
    run = _run_dir(tmp_path, _history(), metrics)
    summary = write_report(run)
    assert summary == run / "report" / "summary.md"
    total = 0
    for png in ("rank_heatmap.png", "rank_by_type.png", "budget.png"):
        data = (run / "report" / png).read_bytes()
        assert data[:8] == PNG_MAGIC
        total += len(data)
        assert f"]({png})" in summary.read_text()
    assert total < 300_000
    text = summary.read_text()
    assert "`adalora`; accuracy 0.8125 (untrained 0.5000) after 25 steps" in text
    assert "- Trainable parameters: 4,096 -> 4,000" in text
    # initial 96; final: attention 8 x 6 = 48, down_proj 3 x 12 + 14 = 50 -> 98
    assert "- Total rank: 96 -> 98 (+2)" in text
    assert "- Budget used: 96 -> 98 rank (step 20)" in text
    assert "- Allocation events: 3 (initial at step 0 + 2 re-allocations, 2 of which moved slots; 18 slots" in text
    assert "| `down_proj` | 32 | 50 | +18 | 51.0 |" in text  # 50 / 98
    assert "| `q_proj` | 32 | 24 | -8 | 24.5 |" in text
    assert "down_proj gained the most rank (+18)" in text
    assert "lost: q_proj (-8), v_proj (-8)." in text
    gains = text.split("**Top 5 gains**")[1].split("**Top 5 losses**")
    assert "| 3 | 24 | 26 | +2 |" in gains[0] and "| 0 |" not in gains[0]  # layers 0-2 are unchanged (+4 - 4)
    assert "none" in gains[1]
    assert "Active modules" not in text


def test_report_with_active_and_out_dir(tmp_path):
    run = _run_dir(tmp_path, _history(with_active=True))
    out = tmp_path / "elsewhere"
    summary = write_report(run, out)
    assert summary == out / "summary.md" and (out / "rank_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    text = summary.read_text()
    assert "| `q_proj` | 1/3 | 33.3 |" in text  # active only at step 0
    assert "| `v_proj` | 3/3 | 100.0 |" in text
    assert "| `down_proj` | 3/3 | 91.7 |" in text  # 11 of 12 module-events


def test_cli_report(tmp_path, capsys):
    run = _run_dir(tmp_path, _history())
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'r' / 'summary.md'}"


def test_cli_missing_dir_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope: no such run directory" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"allocation_history\.json: not found"),
        ("{not json", r"allocation_history\.json: not valid JSON"),
        ("[]", r"allocation_history\.json: expected a non-empty list"),
        ('[{"step": 0, "budget": 4}]', r"allocation_history\.json: event 0 has no valid 'ranks'"),
        ('[{"step": 0, "budget": 4, "ranks": {"a.0.q": -1}}]', r"event 0: 'ranks' must map module names to ranks"),
    ],
)
def test_bad_history_names_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "allocation_history.json").write_text(content)
    with pytest.raises(UserInputError, match=message):
        write_report(tmp_path)
