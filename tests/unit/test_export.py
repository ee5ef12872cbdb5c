"""The exported directory is a stock PEFT LoRA adapter: PEFT loads it onto the base model and computes what our
trained model computes (gates, masks and scaling folded in), also after merge_and_unload()."""

from __future__ import annotations

import json

import pytest
import torch

from ds_dynrank import DynRankConfig, inject_lora
from ds_dynrank.export import export_settings, from_adapters, gather_full, write_peft_adapter


def _trained_like(model_dir, cfg: DynRankConfig):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapters = inject_lora(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (_, layer) in enumerate(adapters):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if layer.lora_gate is not None:
                layer.lora_gate.copy_(torch.rand(layer.lora_gate.shape, generator=g))
            layer.rank_mask.copy_((torch.rand(layer.capacity, generator=g) > 0.4).float())
            if i == 3:
                layer.rank_mask.zero_()  # a module pruned to rank 0 is left out of the adapter
    return model, adapters


@pytest.mark.parametrize(
    "cfg",
    [
        DynRankConfig(method="l1ra", r=4, capacity=8),
        DynRankConfig(r=6, use_rslora=True, rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 5.0}),
    ],
    ids=["l1ra-gates-masks", "rslora-patterns"],
)
def test_peft_loads_the_export_and_computes_the_same(tiny_model_dir, tmp_path, cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, adapters = _trained_like(tiny_model_dir, cfg)
    modules = from_adapters(adapters, gather_full(adapters))
    out = write_peft_adapter(tmp_path / "adapter", modules, base_model=str(tiny_model_dir), **export_settings(adapters))
    config = json.loads((out / "adapter_config.json").read_text())
    dead = adapters[3][0]
    assert dead not in config["target_modules"] and dead not in config["rank_pattern"]
    assert config["rank_pattern"][adapters[0][0]] == adapters[0][1].rank
    assert config["base_model_name_or_path"] == str(tiny_model_dir)

    ids = torch.randint(0, 100, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        plain = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, out).eval()
        theirs = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapters matter
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)


def test_nothing_live_is_an_error(tiny_model_dir, tmp_path):
    model, adapters = _trained_like(tiny_model_dir, DynRankConfig(r=2))
    for _, layer in adapters:
        layer.rank_mask.zero_()
    with pytest.raises(ValueError, match="nothing to export"):
        write_peft_adapter(tmp_path / "a", from_adapters(adapters, gather_full(adapters)), base_model="x")
    assert not (tmp_path / "a").exists()
