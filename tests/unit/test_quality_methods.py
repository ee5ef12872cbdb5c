"""launch/quality_arms.py, the quality benchmark's arms as data: every arm at every budget and trial builds a config
the job accepts and holds the budget's parameters; the trials are as many as LoRA's, each learning rate and knob
value once; `arm+key=value` overrides reach the method's own section; a bad spec is named before any run, and the
command (in this process, on a config-only model) stops on one before writing anything. Shapes are SmolLM2-135M's,
written out (no model loads)."""

from __future__ import annotations

import re
import sys

import pytest
from helpers import REPO, math_messages, tiny_llama_config, write_jsonl

sys.path.insert(0, str(REPO / "launch"))

import quality  # noqa: E402
import quality_arms as qa  # noqa: E402
import quality_tables as qt  # noqa: E402

from ds_dynrank.config import from_ds_config  # noqa: E402

SHAPES = {
    "self_attn.q_proj": 1152,
    "self_attn.k_proj": 768,
    "self_attn.v_proj": 768,
    "self_attn.o_proj": 1152,
    "mlp.gate_proj": 2112,
    "mlp.up_proj": 2112,
    "mlp.down_proj": 2112,
}
COSTS = {f"model.layers.{i}.{n}": c for i in range(30) for n, c in SHAPES.items()}
LRS = [3e-4, 1e-3, 3e-3]


@pytest.mark.parametrize("r", [1, 2, 8])
@pytest.mark.parametrize("arm", list(qa.ARMS))
def test_every_arm_builds_configs_the_job_accepts_at_the_budget(arm, r):
    ctx = qa.Ctx(r, 300, COSTS)
    trials = qa.trials(arm, ctx, LRS)
    assert sorted(t["lr"] for t in trials) == LRS  # as many trials as LoRA's, each learning rate once
    for name, values in qa.ARMS[arm].knobs(ctx).items():  # each knob value once (a Latin design)
        assert sorted({t[name] for t in trials}) == sorted(set(values))
    for settings in trials:
        script, cfg = qa.build_config(arm, ctx, settings)
        assert (REPO / "launch" / script).is_file()
        assert cfg["optimizer"]["params"]["lr"] == settings["lr"] == cfg["scheduler"]["params"]["warmup_max_lr"]
        start = qa.live_parameters(qa.start_ranks(arm, ctx, cfg), COSTS)
        if arm in ("adalora", "peft-adalora"):  # PEFT's convention: start above the budget, prune to it
            assert start > ctx.budget
            continue
        assert abs(start - ctx.budget) <= qa.tolerance(ctx), (arm, start, ctx.budget)
        if qa.ARMS[arm].section == "dynrank":
            section = from_ds_config(cfg)
            assert section.budget.unit == (
                "params" if arm in ("l1ra", "alora", "gora", "random", "gora-l1ra") else "rank"
            )


@pytest.mark.parametrize("r", [1, 2, 8])
def test_the_mlp_heavy_pattern_moves_rank_from_attention_to_the_mlp_at_equal_parameters(r):
    ctx = qa.Ctx(r, 300, COSTS)
    _, cfg = qa.build_config("mlp-heavy", ctx, {"lr": 1e-3})
    ranks = qa.initial_ranks(cfg["dynrank"], COSTS)
    mlp = [ranks[n] for n in ranks if ".mlp." in n]
    attention = [ranks.get(n, 0) for n in COSTS if ".self_attn." in n]
    assert sum(mlp) / len(mlp) > r > max(attention) or (r == 1 and max(attention) == 0 and min(mlp) >= r)
    assert max(mlp) - min(mlp) <= 1
    assert 0 <= ctx.budget - qa.live_parameters(ranks, COSTS) < SHAPES["mlp.up_proj"]  # within one MLP rank below
    scaling = {n: qa._pattern_value(n, cfg["dynrank"]["alpha_pattern"], 0) / rank for n, rank in ranks.items()}
    assert set(scaling.values()) == {2.0}  # every module keeps LoRA's alpha / r


@pytest.mark.parametrize(
    ("spec", "section", "expected"),
    [
        ("l1ra+l1_lambda=0.05+gate_lr=0.2", "l1ra", {"l1_lambda": 0.05, "gate_lr": 0.2}),
        ("modalloc-topk+k=40", "modalloc", {"k": 40, "strategy": "topk"}),
        ("alora+rounds=3", "alora", {"rounds": 3, "val_samples": 2}),
    ],
)
def test_overrides_reach_the_methods_own_section_and_stop_that_knob_being_tuned(spec, section, expected):
    ctx = qa.Ctx(8, 300, COSTS)
    trials = qa.trials(spec, ctx, LRS)
    for settings in trials:
        _, cfg = qa.build_config(spec, ctx, settings)
        assert {k: cfg["dynrank"][section][k] for k in expected} == expected
    assert not any(f"dynrank.{section}.{k}" in t for t in trials for k in expected)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("l1ra+l1_lambdaa=0.1", ["l1_lambdaa"]),
        ("l1ra+l1_lambda=-1", ["l1_lambda"]),
        ("lora+r=4", ["lora", "no method"]),
        ("peft-adalora+init_r=4", ["peft-adalora", "no method"]),
        ("l1ra+l1_lambda", ["key=value"]),
        ("sora", ["unknown", "sora"]),
    ],
)
def test_a_bad_spec_names_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=re.escape(words[0])) as err:
        qa.build_config(spec, qa.Ctx(8, 300, COSTS), {"lr": 1e-3})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_paired_differences_are_claimed_only_beyond_two_standard_errors():
    lora = {0: 1.0, 1: 1.1, 2: 0.9}
    mean, se, pairs = qt.paired({0: 0.9, 1: 1.0, 2: 0.8}, lora)  # 0.1 lower on every seed
    assert pairs == 3 and mean == pytest.approx(-0.1) and se == pytest.approx(0.0, abs=1e-12)
    assert qt.claim(mean, se, lower_is_better=True) == "better"
    assert qt.claim(mean, se, lower_is_better=False) == "worse"
    mean, se, _ = qt.paired({0: 0.8, 1: 1.3, 2: 0.9}, lora)  # -0.2, +0.2, 0: inside two SE
    assert qt.claim(mean, se, lower_is_better=True) == "no"
    assert qt.claim(*qt.paired({0: 0.5}, lora)[:2], lower_is_better=True) == "n/a"  # one pair: no SE


def _config_only_model(path):
    """What the command reads of a model before any run: its config (the skeleton's shapes)."""
    tiny_llama_config().save_pretrained(path)
    return path


def test_the_command_stops_on_a_bad_override_before_writing_anything(tmp_path):
    model = _config_only_model(tmp_path / "model")
    out = tmp_path / "out"
    code = quality.main(["--out", str(out), "--arms", "lora,l1ra+l1_lambda=-1", "--model", str(model)])
    assert code == 2 and not out.exists()  # the valid lora run did not start either


def test_summarise_only_starts_nothing_and_still_writes_the_tables(tmp_path, capsys):
    model, data = _config_only_model(tmp_path / "model"), write_jsonl(tmp_path / "chats.jsonl", math_messages(16))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--tasks", str(data), "--arms", "lora,gora", "--model", str(model), "--summarise_only"]
    assert quality.main(argv) == 0
    assert "[quality] start" not in capsys.readouterr().out
    assert not (out / "chats").exists() and not (out / "tuning.json").exists()
    assert "Protocol:" in (out / "quality.md").read_text() and (out / "quality_pareto.png").is_file()


def test_the_random_control_takes_l1ras_schedule_budget_and_capacity():
    ctx = qa.Ctx(1, 300, COSTS)
    (_, random_cfg), (_, l1ra_cfg) = (qa.build_config(a, ctx, {"lr": 1e-3}) for a in ("random", "l1ra"))
    control, method = from_ds_config(random_cfg), from_ds_config(l1ra_cfg)
    assert control.method == "random" and method.method == "l1ra"
    for field in ("schedule", "budget", "capacity", "r", "lora_alpha", "target_modules"):
        assert getattr(control, field) == getattr(method, field), field
    assert control.schedule.interval == 15  # L1RA's paper: 5% of the run
    moves = {t["dynrank.random.moves"] for t in qa.trials("random", ctx, LRS)}
    assert moves == {21, 52, 105}  # a tenth, a quarter and half of the 210 ranks at r1


def test_module_allocation_tunes_its_strategy_beside_k():
    ctx = qa.Ctx(8, 300, COSTS)
    trials = qa.trials("modalloc", ctx, LRS)
    assert {t["dynrank.modalloc.strategy"] for t in trials} == {"topk", "discounted", "multinomial"}
    assert {t["dynrank.modalloc.k"] for t in trials} == {70, 105, 140}
    for settings in trials:
        section = from_ds_config(qa.build_config("modalloc", ctx, settings)[1]).modalloc
        assert (section.strategy, section.k) == (settings["dynrank.modalloc.strategy"], settings["dynrank.modalloc.k"])


def _runs(arm, values, ranks, active=None):
    return [
        qt.Run("math", "r1", "test", arm, "lr0.001", seed, {"eval_loss": v, "steps": 300,
               **({"trainable_parameters_active": active} if active else {})}, 36.0, dict(ranks), dict(ranks))
        for seed, v in enumerate(values)
    ]  # fmt: skip


def test_the_targets_weigh_the_best_method_against_the_controls_and_time_module_allocation():
    ctx = qa.Ctx(1, 300, COSTS)
    uniform, task = dict.fromkeys(COSTS, 1), qa.TASKS["math"]
    runs = (
        _runs("lora", [1.00, 1.10, 0.90], uniform)
        + _runs("l1ra", [0.90, 1.00, 0.80], uniform)  # 0.1 below LoRA on every seed
        + _runs("random", [0.95, 1.05, 0.85], uniform)  # l1ra 0.05 below it on every seed
        + _runs("mlp-heavy", [0.80, 1.30, 0.90], uniform)  # l1ra's differences -0.1, +0.3, -0.1: inside 2 SE
        + _runs("modalloc", [1.01, 1.09, 0.91], uniform, active=0.5 * ctx.budget)
    )
    kinds = {a: qa.arm_kind(a) for a in ("lora", "l1ra", "random", "mlp-heavy", "modalloc")}
    kinds["modalloc"] = "static"  # l1ra alone is the dynamic method here
    table = qt.summarise(runs, {"math": task}, {"r1": ctx}, kinds)["math"]["r1"]
    verdicts = {target: status for target, status, _ in table["targets"]}
    assert verdicts["a dynamic method better than tuned LoRA beyond 2 SE"] == "met"
    assert verdicts["the best dynamic method (l1ra) better than random beyond 2 SE"] == "met"
    assert verdicts["the best dynamic method (l1ra) better than mlp-heavy beyond 2 SE"] == "missed"
    modalloc = "modalloc not worse than tuned LoRA beyond 2 SE, training at most 0.6 x its parameters"
    assert verdicts[modalloc] == "met"
    assert table["cpu_hours"]["test"] == pytest.approx(15 * 36 / 3600)


def test_the_choice_is_the_best_trial_by_the_headline_and_the_first_on_a_tie():
    trials = [(0.9, {"lr": 1e-3}, "a"), (0.5, {"lr": 3e-3}, "b"), (0.5, {"lr": 3e-4}, "c"), (0.7, {}, "d")]
    assert quality.best(trials, lower_is_better=True)[2] == "b"
    assert quality.best(trials, lower_is_better=False)[2] == "a"


def test_the_random_controls_seeds_draw_their_own_decisions_and_keep_their_own_configs():
    ctx = qa.Ctx(1, 300, COSTS)
    _, cfg = qa.build_config("random", ctx, {"lr": 3e-3, "dynrank.random.moves": 21})
    job = quality.Job("math", "r1", "test", "random", "lr0.003+moves=21", 2, "test.jsonl", "train.py", cfg)
    seeded = quality.seeded(job)
    assert seeded.cfg["dynrank"]["random"] == {**cfg["dynrank"]["random"], "seed": 2}
    assert cfg["dynrank"]["random"]["seed"] == 0  # the arm's config itself is untouched
    assert seeded.config_name == "ds_config.seed2.json" and from_ds_config(seeded.cfg).random.seed == 2
    fixed = quality.Job("math", "r1", "test", "random+seed=5", "lr0.003", 2, "t", "train.py",
                        qa.build_config("random+seed=5", ctx, {"lr": 3e-3})[1])  # fmt: skip
    assert quality.seeded(fixed) == fixed  # a spec that fixes the decisions' seed keeps it on every seed
    _, l1ra = qa.build_config("l1ra", ctx, {"lr": 3e-3})
    assert quality.seeded(quality.Job("math", "r1", "test", "l1ra", "lr0.003", 2, "t", "train.py", l1ra)).cfg is l1ra


def test_a_replayed_list_of_moves_survives_the_arms_flag_and_fixes_that_knob():
    moves = [0, 1, 5, 3, 8, 6, 6, 10, 13, 11, 18, 19, 31, 13, 19, 13, 30, 15, 14]
    spec = "random+moves=" + ",".join(map(str, moves)).join("[]")
    assert qa.split_arms(f"lora,{spec},gora") == ["lora", spec, "gora"]
    assert quality.parse_args(["--arms", f"lora,{spec}"]).arms == ["lora", spec]
    ctx = qa.Ctx(1, 300, COSTS)
    trials = qa.trials(spec, ctx, LRS)
    assert trials == [{"lr": lr} for lr in LRS] and qa.trial_label(trials[2]) == "lr0.003"
    assert from_ds_config(qa.build_config(spec, ctx, trials[2])[1]).random.moves == moves


def test_publishing_copies_each_seeds_own_config_beside_the_shared_one(tmp_path):
    trial = tmp_path / "out" / "math" / "r1" / "test" / "random" / "lr0.003+moves=21"
    for seed in (0, 1):
        (trial / f"seed{seed}").mkdir(parents=True)
        (trial / f"seed{seed}" / "metrics.json").write_text("{}")
        (trial / f"ds_config.seed{seed}.json").write_text("{}")
    (trial / "ds_config.json").write_text("{}")
    (trial / "ds_config.seed2.json").write_text("{}")  # the seed of a run still going: published with its trial
    results = tmp_path / "results"
    quality.publish(tmp_path / "out", results, tmp_path / "out" / "tuning.json")
    copied = sorted(p.name for p in (results / trial.relative_to(tmp_path / "out")).glob("ds_config*.json"))
    assert copied == ["ds_config.json", "ds_config.seed0.json", "ds_config.seed1.json", "ds_config.seed2.json"]
