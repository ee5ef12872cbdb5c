"""What the controller's state brings back on resume beyond DeepSpeed's: here, the budget the run started with. A
physical-backend resume builds the model at the saved (pruned) shapes, so the budget in use then is not the
initial one, and AdaLoRA's cubic schedule, which starts from the initial budget, would continue from the wrong
point."""

from __future__ import annotations

from helpers import SteppingEngine, tiny_llama

from ds_dynrank.api import prepare
from ds_dynrank.config import from_ds_config
from ds_dynrank.controller import DynRank

CFG = from_ds_config({"dynrank": {"method": "adalora", "r": 4, "reshape": {"backend": "physical"}}})


def _controller(ranks: dict[str, int] | None = None) -> DynRank:
    model = tiny_llama()
    setup = prepare(model, CFG, ds_config={"train_micro_batch_size_per_gpu": 1})
    if ranks is not None:  # what the physical backend does before the engine exists on resume
        setup.adapters = setup.backend.resize_for_resume(model, setup.adapters, ranks, {})
    return DynRank(SteppingEngine(model), setup, total_steps=20)


def test_a_physical_resume_keeps_the_initial_budget():
    first = _controller()
    state = first.state_dict()
    pruned = {name: 2 for name, _ in first.adapters}
    resumed = _controller(pruned)
    assert resumed.initial_budget == first.initial_budget // 2  # built at the saved shapes
    resumed.load_state_dict(state)
    assert resumed.initial_budget == first.initial_budget


def test_a_checkpoint_without_it_takes_the_first_history_entry():
    first = _controller()
    first.history = [{"step": 0, "budget": first.initial_budget}]
    state = {k: v for k, v in first.state_dict().items() if k != "initial_budget"}
    resumed = _controller({name: 2 for name, _ in first.adapters})
    resumed.load_state_dict(state)
    assert resumed.initial_budget == first.initial_budget
