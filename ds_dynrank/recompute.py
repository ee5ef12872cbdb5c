"""Activation checkpointing (non-reentrant): turning it on for a transformers model, and telling forward hooks
whether the forward they see is a real one or its recomputation during backward.

Non-reentrant checkpointing replays a layer's forward inside backward to rebuild the activations it did not keep,
and every forward hook inside that layer fires again. A statistic counted in a forward hook (module allocation's
activation scores) must skip the replay, or checkpointing would count each micro-batch twice.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_dynrank.errors import UserInputError

# reentrant checkpointing runs its first forward without autograd and needs inputs that require grad; ours does not
CHECKPOINT_KWARGS = {"use_reentrant": False}


def in_recomputation() -> bool:
    """A forward inside the autograd engine's backward is a recomputation: the signal torch.utils.checkpoint keys
    its own replay on, and the same for any checkpointing scheme (a real forward never runs inside backward)."""
    return torch._C._current_graph_task_id() != -1


def counts_forward(module: nn.Module) -> bool:
    """Whether a forward hook on `module` should count this forward: a training forward (not evaluation, not a
    no-grad scoring forward) that is not a recomputation, so exactly once per micro-batch, checkpointed or not."""
    return module.training and torch.is_grad_enabled() and not in_recomputation()


def check_supported(model: nn.Module, field: str) -> None:
    """Refuse, naming `field`, a model transformers cannot checkpoint (before training, not at its first step)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserInputError(
            f"{field}: {type(model).__name__} does not support activation checkpointing "
            "(its supports_gradient_checkpointing is False); train without it"
        )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer, non-reentrant, before the adapters are injected; a model without support is
    refused. transformers' hook that makes the embeddings' output require grad is removed again: only reentrant
    checkpointing needs it, and without it the graph is the one an unchecked run builds."""
    check_supported(model, "--gradient_checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
