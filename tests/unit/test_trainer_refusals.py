"""What DynRankTrainer and DynRankSFTTrainer refuse before any training step, each with one line that says what
to do instead; and where ALoRA's scoring batch comes from under a trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, tiny_llama

from ds_dynrank.config import from_ds_config
from ds_dynrank.errors import UserInputError
from ds_dynrank.hf import DynRankTrainer, DynRankTrainerMixin, validation_batch

ALORA = from_ds_config({"dynrank": {"method": "alora", "alora": {"val_samples": 3}}})


def test_a_peft_config_is_refused_since_the_adapters_are_ours(tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig

    from ds_dynrank import DynRankSFTTrainer

    with pytest.raises(UserInputError, match=r"^peft_config: DynRankSFTTrainer injects its own LoRA adapters"):
        DynRankSFTTrainer(
            model=tiny_llama(), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True), peft_config=LoraConfig()
        )


def test_a_trainer_config_with_an_optimizer_is_refused():
    """Trainer builds the optimizer, with the method's param groups (L1RA's gates at their own learning rate)."""
    from ds_dynrank.config import load_ds_config
    from ds_dynrank.hf import trainer_config

    raw = load_ds_config(REPO / "ds_configs" / "zero2_l1ra.json")  # the own loop's config, with its optimizer
    with pytest.raises(UserInputError, match=r"^dynrank: with DynRankTrainer leave 'optimizer' out of the DeepSpeed"):
        trainer_config(raw, 0.0)


def test_a_trainer_without_deepspeed_is_refused(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(UserInputError, match=r"the trainer runs without DeepSpeed.*TrainingArguments\(deepspeed="):
        DynRankTrainer(model=tiny_llama(), args=args)


def _collate(rows: list[dict]) -> dict:
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "position_ids": ids * 0}


def test_alora_scores_on_the_first_rows_of_the_eval_dataset():
    rows = [{"input_ids": [i, i + 1, i + 2]} for i in range(5)]
    batch = validation_batch(SimpleNamespace(eval_dataset=rows, data_collator=_collate), ALORA)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # what the scoring forward takes
    assert batch["input_ids"][:, 0].tolist() == [0, 1, 2]
    named = SimpleNamespace(eval_dataset={"validation": rows}, data_collator=_collate)  # Trainer's dict form
    assert torch.equal(validation_batch(named, ALORA)["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(("rows", "have"), [(None, "no eval_dataset"), ([{"input_ids": [1]}], "of 1 rows")])
def test_alora_without_enough_validation_rows_is_refused(rows, have):
    trainer = SimpleNamespace(eval_dataset=rows, data_collator=_collate)
    with pytest.raises(UserInputError, match=rf"^dynrank\.alora\.val_samples: .* 3 validation rows .*{have}"):
        validation_batch(trainer, ALORA)


def test_resuming_from_a_folder_no_ds_dynrank_trainer_wrote_is_refused(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(UserInputError, match=r"checkpoint-4 holds no dynrank_state\.pt"):
        DynRankTrainerMixin._reshape_for(SimpleNamespace(), tmp_path / "checkpoint-4")
