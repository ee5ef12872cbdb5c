"""Activation checkpointing in one process, no DeepSpeed: the flag, the refusal of a model that cannot checkpoint,
and what the hooks see. With it on, the layers' forwards are replayed inside backward (and recognised as such),
every adapter still gets its gradient without transformers' input-grad hook, and the gradients are bit for bit
those of the unchecked model. The 2-process runs under ZeRO-2/3 are tests/zero/test_recompute_engine.py."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from transformers import LlamaForCausalLM

from ds_dynrank.api import prepare
from ds_dynrank.config import from_ds_config
from ds_dynrank.errors import UserInputError
from ds_dynrank.recompute import counts_forward, enable_activation_checkpointing, in_recomputation
from ds_dynrank.task.job import parse_args


class NoCheckpointing(LlamaForCausalLM):
    supports_gradient_checkpointing = False


def test_the_flag_is_off_by_default():
    assert parse_args([]).gradient_checkpointing is False
    assert parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True


def test_a_model_that_cannot_checkpoint_is_refused_naming_the_flag():
    model = NoCheckpointing(tiny_llama().config)
    with pytest.raises(UserInputError, match=r"^--gradient_checkpointing: NoCheckpointing does not support activ"):
        enable_activation_checkpointing(model)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_the_trainer_refuses_a_model_that_cannot_checkpoint(tmp_path):
    from transformers import TrainingArguments

    from ds_dynrank.hf import DynRankTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing=True, report_to=[])
    with pytest.raises(UserInputError, match=r"^activation_checkpointing: NoCheckpointing does not support"):
        DynRankTrainer(model=NoCheckpointing(tiny_llama().config), args=args)


def _train_once(checkpointing: bool) -> tuple[dict, dict, list]:
    """One forward and backward of the tiny Llama with LoRA (dropout on): the adapters' gradients, the calls a
    forward hook on an early module saw, and which of its calls counts_forward would count."""
    model = tiny_llama(seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
        assert not getattr(model, "_require_grads_hooks", None)  # the embeddings' output does not require grad
    adapters = dict(prepare(model, from_ds_config({"dynrank": {"r": 4, "lora_dropout": 0.1}})).adapters)
    calls, counted = {"forwards": 0, "recomputed": 0}, []

    def hook(module, inputs, output) -> None:
        calls["forwards"] += 1
        calls["recomputed"] += in_recomputation()
        counted.append(counts_forward(module))

    adapters["model.layers.0.self_attn.q_proj"].register_forward_hook(hook)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():  # an evaluation forward, not counted
        model(input_ids=ids)
    grads = {name: layer.lora_B.grad.clone() for name, layer in adapters.items()}
    return grads, calls, counted


def test_replayed_forwards_are_recognised_and_gradients_are_unchanged():
    plain, plain_calls, plain_counted = _train_once(checkpointing=False)
    grads, calls, counted = _train_once(checkpointing=True)
    assert plain_calls == {"forwards": 2, "recomputed": 0} and plain_counted == [True, False]
    assert calls == {"forwards": 3, "recomputed": 1}  # the training forward, its replay in backward, evaluation
    assert counted == [True, False, False]
    assert len(grads) == 14 and all(g.abs().sum() > 0 for g in grads.values())  # layer 0's adapters included
    assert all(torch.equal(grads[name], plain[name]) for name in plain)
