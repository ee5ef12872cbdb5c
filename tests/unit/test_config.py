"""The "dynrank" section: defaults, strict validation with field-naming messages, shipped configs, README table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ds_dynrank.config import DynRankConfig, check_deepspeed_compat, from_ds_config, load_ds_config, schema_table
from ds_dynrank.ds_config import resolve
from ds_dynrank.errors import UserInputError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_plain_lora():
    cfg = from_ds_config({})
    assert cfg.method == "lora" and cfg.r == 8 and cfg.target_modules == "all-linear" and cfg.capacity is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"rank": 8}, r"dynrank\.rank: unknown key \(known keys: method, target_modules"),
        ({"r": -4}, r"dynrank\.r: Input should be greater than or equal to 1 \(got -4\)"),
        ({"r": "eight"}, r"dynrank\.r: Input should be a valid integer.*\(got 'eight'\)"),
        (
            {"method": "l2ra"},
            r"dynrank\.method: Input should be 'lora', 'l1ra', 'alora', 'modalloc', 'adalora', 'gora', 'random' "
            r"or 'gora_l1ra' \(got 'l2ra'\)",
        ),
        ({"lora_dropout": 1.0}, r"dynrank\.lora_dropout: Input should be less than 1"),
        ({"lora_alpha": 0}, r"dynrank\.lora_alpha: Input should be greater than 0"),
        ({"target_modules": []}, r"dynrank\.target_modules: .*must name at least one module"),
        ({"target_modules": "q_proj("}, r"dynrank\.target_modules: .*not a valid regular expression"),
        ({"rank_pattern": {"v_proj": 0}}, r"dynrank\.rank_pattern: .*must be > 0"),
        ({"r": 8, "capacity": 4}, r"dynrank: .*capacity \(4\) must be >= the largest initial rank \(8\)"),
        ({"r": 4, "rank_pattern": {"q": 12}, "capacity": 8}, r"largest initial rank \(12\)"),
        ({"method": "alora", "alora": {"rounds": 0}}, r"dynrank\.alora\.rounds: Input should be greater than"),
        ({"method": "alora", "alora": {"k1_epochs": 0}}, r"dynrank\.alora\.k1_epochs: Input should be greater"),
        ({"method": "l1ra", "alora": {"rounds": 2}}, r"alora: only used by method alora, but method is 'l1ra'"),
        ({"method": "modalloc", "modalloc": {"strategy": "best"}}, r"dynrank\.modalloc\.strategy: Input should be"),
        (
            {"method": "modalloc", "modalloc": {"threshold": 1.5, "strategy": "threshold"}},
            r"dynrank\.modalloc\.threshold: Input should be less than or equal to 1",
        ),
        (
            {"method": "modalloc", "modalloc": {"threshold": 0.0, "strategy": "threshold"}},
            r"dynrank\.modalloc\.threshold: Input should be greater than 0",
        ),
        ({"method": "modalloc", "modalloc": {"threshold": 0.5}}, r"threshold: only used by strategy 'threshold'"),
        ({"method": "modalloc", "modalloc": {"k": 3, "strategy": "threshold"}}, r"k: strategy 'threshold' sizes"),
        ({"method": "modalloc", "modalloc": {"score": "weights"}}, r"dynrank\.modalloc\.score: Input should be"),
        ({"method": "modalloc", "budget": {"floor": 1}}, r"budget: method modalloc keeps every rank"),
        ({"method": "modalloc", "capacity": 16}, r"capacity: method 'modalloc' never grows a module"),
        ({"method": "modalloc", "schedule": {"kind": "once", "interval": 5}}, r"kind 'once' fires at start only"),
        ({"method": "modalloc", "schedule": {"kind": "twice"}}, r"dynrank\.schedule\.kind: Input should be"),
        ({"method": "adalora", "r": 8, "adalora": {"target_r": 12}}, r"adalora\.target_r \(12\.0\) must be <= r"),
        ({"method": "adalora", "schedule": {"interval": 2}}, r"schedule: method adalora follows its cubic schedule"),
        ({"method": "adalora", "budget": {"unit": "params"}}, r"budget\.unit: method adalora counts its budget"),
        ({"method": "adalora", "adalora": {"beta1": 1.0}}, r"dynrank\.adalora\.beta1: Input should be less than 1"),
        ({"method": "adalora", "adalora": {"delta_t": 0}}, r"dynrank\.adalora\.delta_t: Input should be greater"),
        ({"method": "lora", "modalloc": {"k": 2}}, r"modalloc: only used by method modalloc, but method is 'lora'"),
        ({"method": "gora", "gora": {"warmup_steps": 0}}, r"dynrank\.gora\.warmup_steps: Input should be greater"),
        ({"method": "gora", "schedule": {"kind": "once"}}, r"schedule: method gora allocates once, right after"),
        ({"method": "l1ra", "schedule": {"start": 20, "stop": 10}}, r"start \(20\) must be <= stop \(10\)"),
        ({"method": "l1ra", "schedule": {"interval": 0}}, r"dynrank\.schedule\.interval: Input should be greater"),
        ({"method": "l1ra", "r": 4, "budget": {"floor": 6}}, r"budget\.floor \(6\) exceeds the smallest initial"),
        ({"method": "l1ra", "r": 8, "budget": {"cap": 4}}, r"budget\.cap \(4\) is below the largest initial rank"),
        ({"method": "l1ra", "budget": {"unit": "bytes"}}, r"dynrank\.budget\.unit: Input should be 'rank' or"),
        ({"method": "l1ra", "l1ra": {"threshold": -1}}, r"dynrank\.l1ra\.threshold: Input should be greater"),
        ({"method": "l1ra", "gate": False}, r"gate: method l1ra needs gate: true"),
        ({"method": "l1ra", "reshape": {"backend": "physical"}, "capacity": 16}, r"capacity: a masked-backend"),
        ({"method": "lora", "schedule": {"interval": 5}}, r"schedule: only used by a dynamic method"),
    ],
)
def test_bad_values_name_the_field(section, expected):
    with pytest.raises(UserInputError, match=expected) as info:
        from_ds_config({"dynrank": section})
    assert "\n" not in str(info.value)


def test_section_must_be_an_object():
    with pytest.raises(UserInputError, match="dynrank: expected a JSON object, got list"):
        from_ds_config({"dynrank": [1]})


def test_load_ds_config_errors(tmp_path):
    with pytest.raises(UserInputError, match="--deepspeed: config file not found"):
        load_ds_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4, "train_micro_batch_size_per_gpu": 8}')
    with pytest.raises(UserInputError, match="duplicate key 'train_micro_batch_size_per_gpu'"):
        load_ds_config(bad)
    bad.write_text('{"zero_optimization": {"stage": 2')
    with pytest.raises(UserInputError, match="is not valid JSON"):
        load_ds_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_resolve(path, tmp_path):
    raw = load_ds_config(path)
    cfg = from_ds_config(raw)
    assert isinstance(cfg, DynRankConfig)
    check_deepspeed_compat(cfg, raw)
    if cfg.dynamic:  # the shipped schedule fires within the default 60-step run (375 steps per epoch there)
        from ds_dynrank.methods.base import build_method
        from ds_dynrank.schedule import check_fits

        schedule = build_method(cfg).schedule(60, 375)
        check_fits(schedule, 60, cfg.method)
        one_shot = schedule.start == schedule.stop  # GoRA: a single event by design
        assert len([s for s in schedule.events() if s < 60]) >= (1 if one_shot else 2), schedule
    if path.name.endswith("peft_adalora.json"):  # the outside peer: PEFT's own AdaLoRA, no "dynrank" section
        assert "dynrank" not in raw and raw["zero_optimization"]["stage"] == 0
        return
    if path.name.startswith("hf_"):  # for HF Trainer, which resolves its own "auto" values
        assert "optimizer" not in raw and "scheduler" not in raw
        return
    if path.name.endswith("peft_eva.json"):  # the EVA peer: PEFT's LoRA from its own section, under ZeRO-2
        assert "dynrank" not in raw and "peft_eva" in raw and raw["zero_optimization"]["stage"] == 2
    else:
        assert "dynrank" in raw
    assert raw["tensorboard"]["enabled"] is True
    cpu = resolve(raw, max_steps=40, output_dir=tmp_path, bf16_supported=False)
    gpu = resolve(raw, max_steps=40, output_dir=tmp_path, bf16_supported=True)
    assert cpu["bf16"]["enabled"] is False and gpu["bf16"]["enabled"] is True
    assert cpu["scheduler"]["params"]["total_num_steps"] == 40
    assert cpu["tensorboard"]["output_path"] == str(tmp_path)
    assert raw["bf16"]["enabled"] == "auto"  # the loaded dict itself is left as written
    json.dumps(cpu)


def test_unresolvable_auto_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match='cannot resolve "auto" for train_batch_size'):
        resolve({"train_batch_size": "auto"}, max_steps=1, output_dir=tmp_path, bf16_supported=False)


def test_readme_config_table_matches_schema():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", readme, re.S)
    assert block, "README lacks the generated config table markers"
    assert block.group(1).strip() == schema_table().strip(), "run `python -m ds_dynrank config-table`"


@pytest.mark.parametrize(
    ("optimizer", "ok"),
    [
        ({"type": "AdamW", "params": {"weight_decay": 0.0}}, True),
        ({"type": "AdamW", "params": {}}, False),
        ({"type": "AdamW", "params": {"weight_decay": 0.1}}, False),
        ({"type": "Adam", "params": {}}, True),
    ],
)
def test_masked_module_allocation_refuses_weight_decay(optimizer, ok):
    raw = {"optimizer": optimizer, "dynrank": {"method": "modalloc"}}
    if ok:
        check_deepspeed_compat(from_ds_config(raw), raw)
        return
    with pytest.raises(UserInputError, match=r"optimizer\.params\.weight_decay: .* method 'modalloc'"):
        check_deepspeed_compat(from_ds_config(raw), raw)
    physical = {**raw, "dynrank": {"method": "modalloc", "reshape": {"backend": "physical"}}}
    check_deepspeed_compat(from_ds_config(physical), physical)  # inactive adapters leave the optimizer there


def test_a_schedule_that_never_fires_in_the_run_is_refused():
    from ds_dynrank.methods.base import build_method
    from ds_dynrank.schedule import check_fits

    cfg = from_ds_config({"dynrank": {"method": "alora"}})
    schedule = build_method(cfg).schedule(60, 375)  # K1 = 1 epoch = 375 steps > 60
    with pytest.raises(UserInputError, match=r"dynrank\.schedule: method 'alora' would first re-allocate at .* 375"):
        check_fits(schedule, 60, "alora")
    assert build_method(cfg).schedule(4000, 375).events()[:3] == [375, 469, 563]  # K2 = 0.25 epoch


def test_a_method_that_needs_a_validation_batch_without_one_is_refused():
    from helpers import tiny_llama

    import ds_dynrank

    config = {"train_micro_batch_size_per_gpu": 1, "dynrank": {"method": "alora", "schedule": {"start": 2}}}
    with pytest.raises(UserInputError, match=r"dynrank\.method: 'alora' scores ranks on a validation batch"):
        ds_dynrank.initialize(tiny_llama(), config, total_steps=100)  # refused before DeepSpeed is even started


CPU, NVME = {"device": "cpu"}, {"device": "nvme"}
DYNAMIC = {"method": "l1ra", "reshape": {"backend": "physical"}}


@pytest.mark.parametrize(
    ("zero", "expected"),
    [
        ({"stage": 3, "offload_optimizer": NVME}, r"zero_optimization\.offload_optimizer\.device: 'nvme'"),
        ({"stage": 3, "offload_param": NVME}, r"zero_optimization\.offload_param\.device: 'nvme'.*libaio"),
        ({"stage": 2, "offload_optimizer": NVME}, r"offload_optimizer\.device: 'nvme'"),
        ({"stage": 3, "offload_optimizer": {**CPU, "ratio": 0.5}}, r"offload_optimizer\.ratio: 0\.5 \(partial offload"),
        ({"stage": 3, "offload_optimizer": {**CPU, "super_offload": True}}, r"super_offload: .*worker process"),
        ({"stage": 2, "offload_optimizer": CPU, "zenflow": {"topk_ratio": 0.1}}, r"zero_optimization\.zenflow: "),
    ],
)
def test_offload_the_engine_cannot_carry_is_refused(zero, expected):
    raw = {"zero_optimization": zero, "dynrank": DYNAMIC}
    with pytest.raises(UserInputError, match=expected):
        check_deepspeed_compat(from_ds_config(raw), raw)
    masked = {**raw, "dynrank": {"method": "l1ra"}}
    with pytest.raises(UserInputError, match=expected):  # both backends read and edit the same state
        check_deepspeed_compat(from_ds_config(masked), masked)
    fixed = {**raw, "dynrank": {"method": "lora"}}  # no event ever touches the state: DeepSpeed's own business
    check_deepspeed_compat(from_ds_config(fixed), fixed)


@pytest.mark.parametrize(
    "zero",
    [
        {"stage": 2, "offload_optimizer": CPU},
        {"stage": 3, "offload_optimizer": CPU, "offload_param": CPU},
        {"stage": 3, "offload_optimizer": {**CPU, "ratio": 1.0}, "offload_param": {"device": "none"}},
        {"stage": 2, "offload_optimizer": {**CPU, "ratio": 0.5}},  # ZeRO-3's knob: DeepSpeed ignores it below
    ],
)
def test_host_offload_is_accepted(zero):
    raw = {"zero_optimization": zero, "dynrank": DYNAMIC}
    check_deepspeed_compat(from_ds_config(raw), raw)


def test_offload_config_is_the_physical_zero3_config_plus_host_offload():
    """zero3_offload.json's offload blocks are the ones the 2-process offload tests run (helpers.offload_settings);
    everything else is zero3_l1ra.json, which the launch tests run."""
    offload = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    base = json.loads((REPO / "ds_configs" / "zero3_l1ra.json").read_text())
    zero = offload["zero_optimization"]
    assert zero.pop("offload_optimizer") == CPU and zero.pop("offload_param") == CPU
    assert offload == base


def test_hf_trainer_refuses_the_same_offload():
    """DynRankTrainer builds no engine through initialize(): it checks the ZeRO settings itself."""
    from ds_dynrank.hf import trainer_config

    raw = load_ds_config(REPO / "ds_configs" / "hf_zero2_l1ra.json")
    assert trainer_config(raw, 0.0).method == "l1ra"
    raw["zero_optimization"]["offload_optimizer"] = NVME
    with pytest.raises(UserInputError, match=r"zero_optimization\.offload_optimizer\.device: 'nvme'"):
        trainer_config(raw, 0.0)
