"""The LoRA layer equals its dense reference and PEFT's LoRA; gradients reach adapters only; masked slots get none."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from ds_dynrank import DynRankConfig, inject_lora, iter_lora
from ds_dynrank.lora import LoRALinear, adapter_parameters


def _randomise(layer: LoRALinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        if layer.lora_gate is not None:
            layer.lora_gate.copy_(torch.rand(layer.lora_gate.shape, generator=g))


@pytest.mark.parametrize("gate", [False, True])
def test_layer_equals_dense_reference(gate):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, capacity=5, alpha=6.0, gate=gate)
    _randomise(layer)
    with torch.no_grad():
        layer.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    x = torch.randn(4, 9, 12, dtype=torch.float64)
    layer = layer.double()
    g = layer.lora_gate if gate else torch.ones(5, dtype=torch.float64)
    # W x + B diag(gate*mask) A x * scale, written out densely
    delta = layer.lora_B @ torch.diag(g * layer.rank_mask) @ layer.lora_A * (6.0 / 3)
    expected = x @ (base.weight.double() + delta).T + base.bias.double()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-12, atol=1e-12)


def test_init_is_function_preserving_and_follows_peft_law():
    base = nn.Linear(64, 16)
    layer = LoRALinear(base, rank=8)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))  # B = 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.rank == 8 and layer.capacity == 8 and layer.scaling == 2.0


def _peft_pair(model_fn, peft_kwargs: dict, ours: DynRankConfig):
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(model_fn(), LoraConfig(lora_dropout=0.0, **peft_kwargs))
    model = model_fn()
    adapters = dict(inject_lora(model, ours))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in reference.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)  # B = 0 would hide scaling bugs
                adapters[name].lora_A.copy_(a)
                adapters[name].lora_B.copy_(b)
                assert adapters[name].scaling == pytest.approx(module.scaling["default"])
    assert set(adapters) == {n for n, m in reference.base_model.model.named_modules() if hasattr(m, "lora_A")}
    return reference, model


@pytest.mark.parametrize(
    ("peft_kwargs", "ours"),
    [
        (dict(r=4, lora_alpha=8, target_modules="all-linear"), DynRankConfig(r=4, lora_alpha=8)),
        (
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True),
            DynRankConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True),
        ),
        (
            dict(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                rank_pattern={"v_proj": 2},
                alpha_pattern={"q_proj": 3},
            ),
            DynRankConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                rank_pattern={"v_proj": 2},
                alpha_pattern={"q_proj": 3},
            ),
        ),
    ],
)
def test_equivalent_to_peft_lora_on_llama(peft_kwargs, ours):
    reference, model = _peft_pair(lambda: tiny_llama(seed=5), peft_kwargs, ours)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert not torch.allclose(expected, tiny_llama(seed=5)(input_ids=ids).logits, atol=1e-4)  # adapters matter
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_equivalent_to_peft_lora_on_gpt2_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(2)
        config = GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config).eval()

    peft_kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    reference, model = _peft_pair(
        gpt2, peft_kwargs, DynRankConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    )
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_gradients_reach_adapters_only_and_masked_slots_get_exact_zero():
    model = tiny_llama(seed=1)
    adapters = inject_lora(model, DynRankConfig(r=3, capacity=6, gate=True))
    for _, layer in adapters:
        _randomise(layer, seed=7)
    _, probe = adapters[0]
    assert probe.rank == 3 and probe.capacity == 6
    loss = model(input_ids=torch.randint(0, 128, (2, 10)), labels=torch.randint(0, 128, (2, 10))).loss
    loss.backward()
    trainable = {id(p) for p in adapter_parameters(iter_lora(model))}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for name, layer in iter_lora(model):
        dead = layer.rank_mask == 0
        assert torch.count_nonzero(layer.lora_A.grad[dead]) == 0, name
        assert torch.count_nonzero(layer.lora_B.grad[:, dead]) == 0, name
        assert torch.count_nonzero(layer.lora_gate.grad[dead]) == 0, name
        assert torch.count_nonzero(layer.lora_A.grad[~dead]) > 0, name


def test_reset_slots_is_function_preserving_and_seeded():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(10, 6), rank=4, gate=True)
    _randomise(layer)
    x = torch.randn(5, 10)
    layer.reset_slots(torch.tensor([1]), generator=torch.Generator().manual_seed(9))
    assert torch.count_nonzero(layer.lora_B[:, 1]) == 0 and layer.lora_gate[1] == 1
    with_reborn_slot = layer(x)
    with torch.no_grad():
        layer.rank_mask[1] = 0
    assert torch.equal(with_reborn_slot, layer(x))  # a reborn slot (B = 0) changes nothing
    row = layer.lora_A[1].clone()
    layer.reset_slots(torch.tensor([1]), generator=torch.Generator().manual_seed(9))
    assert torch.equal(layer.lora_A[1], row)  # the same seed gives the same rows on every rank
