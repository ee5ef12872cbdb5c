"""An outside peer: PEFT's own EVA (Explained Variance Adaptation) on the same task, data, steps and evaluation as
launch/train.py, driven the way PEFT documents it.

    deepspeed --num_gpus 2 launch/train_peft_eva.py --deepspeed ds_configs/zero2_peft_eva.json

`LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=...))`, then, before DeepSpeed starts,
`initialize_lora_eva_weights`: an incremental SVD of every adapted layer's inputs over batches of the training data
(cycled until the components converge), and one redistribution of the total rank r x modules by explained
variance, no module above round(r * rho). After that it is ordinary LoRA, trained here under ZeRO-2.

Every rank runs PEFT's SVD on its own shard of the first training batches (the loader it then trains on), and
PEFT all-gathers the layer inputs (`gather_distributed_inputs`, its default; it asks for distinct inputs per rank),
so every rank fits the same components to the same gathered tokens. Rank 0's result is then broadcast and loaded
everywhere, so the adapters are identical on every rank even if the SVD is not bitwise reproducible on the device
(ranks whose SVDs converged at different forwards would desynchronise PEFT's gathers, though: they agree bit for
bit here, tests/e2e/test_peft_eva_peer.py); each rank prints a digest of its adapters and of its own SVD. The run
writes the same `metrics.json` as launch/train.py, plus `allocation.json` (the rank per module EVA chose; 0 where it
left a module without an adapter).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ds_dynrank.errors import UserInputError  # noqa: E402
from ds_dynrank.task.job import run_main  # noqa: E402

# LoraConfig's and EvaConfig's own fields (PEFT's names and defaults, except r/alpha/targets: our shared budget)
LORA_FIELDS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
EVA_FIELDS = {"rho": 2.0, "tau": 0.99, "use_label_mask": None, "whiten": False, "adjust_scaling_factors": True}
# ours: which batches PEFT's dataloader holds, and a bound on its loop (PEFT's has none)
INIT_FIELDS = {"init_batches": None, "init_batch_size": None, "init_max_forwards": 500}


def eva_settings(section: dict, task: str):
    """(LoraConfig, init knobs) from the `"peft_eva"` section; null keeps the default. `use_label_mask` defaults
    to PEFT's True for SFT and False for classification, whose label is one or two tokens of each row: PEFT's
    EvaConfig advises False "for cases where a large share of batch items would be filtered out", and with it on
    the SVD sees too few tokens (fewer than its components: PEFT skips the batch, again and again). Our checks come
    before PEFT loads (seconds), PEFT's own (rho, tau) after."""
    known = {**LORA_FIELDS, **EVA_FIELDS, **INIT_FIELDS}
    if not isinstance(section, dict):
        raise UserInputError(f"peft_eva: must be an object, got {type(section).__name__}")
    unknown = set(section) - set(known)
    if unknown:
        raise UserInputError(f"peft_eva: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(known))})")
    values = {**known, **{k: v for k, v in section.items() if v is not None}}
    if values["use_label_mask"] is None:
        values["use_label_mask"] = task == "sft"
    for name in ("r", "init_batches", "init_batch_size", "init_max_forwards"):
        value = values[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserInputError(f"peft_eva.{name}: must be an integer >= 1, got {value!r}")
    for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        if not isinstance(values[name], bool):
            raise UserInputError(f"peft_eva.{name}: must be true or false, got {values[name]!r}")
    for name in ("rho", "tau", "lora_alpha", "lora_dropout"):
        if isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
            raise UserInputError(f"peft_eva.{name}: must be a number, got {values[name]!r}")
    if values["lora_alpha"] <= 0 or not 0 <= values["lora_dropout"] < 1:
        raise UserInputError(
            f"peft_eva: lora_alpha must be > 0 and lora_dropout in [0, 1), got {values['lora_alpha']!r} and "
            f"{values['lora_dropout']!r}"
        )
    from peft import EvaConfig, LoraConfig

    try:
        eva = EvaConfig(**{k: values[k] for k in EVA_FIELDS})
        lora = LoraConfig(
            task_type="CAUSAL_LM", init_lora_weights="eva", eva_config=eva, **{k: values[k] for k in LORA_FIELDS}
        )
    except (ValueError, TypeError) as err:
        raise UserInputError(f"peft_eva: {str(err).replace('`', '')}") from None
    return lora, {k: values[k] for k in INIT_FIELDS}


def check_stage(raw: dict) -> int:
    """ZeRO 0-2. EVA's SVD reads each layer's whole inputs and writes whole lora_A matrices before DeepSpeed
    starts; after that the adapters are a static LoRA, which ZeRO-2 shards like any other (no in-place edit of
    the working weights that an fp32 master would undo, unlike PEFT's AdaLoRA masks). ZeRO-3's partitioned
    weights this peer does not handle."""
    stage = (raw.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserInputError(f"zero_optimization.stage: the PEFT EVA peer runs under ZeRO 0-2, got {stage}")
    return stage


def init_batches(data, args, micro_batch: int, count: int | None) -> list[dict]:
    """This rank's first `count` batches of epoch 0 (all of them if None): the loader it trains on, as PEFT's
    EVA example passes the finetuning dataloader. A list, so PEFT's `len()` and `cycle()` see fixed batches."""
    from ds_dynrank.task import job

    items, collate = data.training_items()
    sampler, loader = job.train_loader(items, collate, args, micro_batch)
    sampler.set_epoch(0)
    batches = []
    for batch in loader:
        job.batch_tokens(batch)  # (packed rows carry their count; the model takes no such input)
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    if count is not None and len(batches) < count:
        raise UserInputError(
            f"peft_eva.init_batches: {count}, but this rank's training shard holds {len(batches)} batches of "
            f"{micro_batch}"
        )
    return batches


def eva_init(model, batches: list[dict], max_forwards: int, device) -> tuple[dict[str, int], int, str]:
    """PEFT's EVA initialisation, identical on every rank (collective): ({module: rank} as EVA chose it, the
    forwards its SVD took, a digest of this rank's own components before rank 0's replaced them).
    Every rank computes `get_eva_state_dict` (its hooks all-gather the layer inputs), rank 0's result is broadcast
    and every rank loads it with `initialize_lora_eva_weights(eva_state_dict=...)`."""
    import torch
    from peft import get_eva_state_dict, initialize_lora_eva_weights
    from peft.tuners.lora.eva import forward_fn_dict

    from ds_dynrank import dist

    forwards = 0

    def bounded_forward(module, inputs):
        """PEFT cycles the batches until every layer's components converge, with no limit: bound it."""
        nonlocal forwards
        forwards += 1
        if forwards > max_forwards:
            raise UserInputError(
                f"peft_eva.init_max_forwards: EVA's SVD had not converged after {max_forwards} forwards over "
                f"{len(batches)} batch(es) per rank (PEFT loops until it does); give more init_batches or a larger "
                "init_batch_size, a lower tau, or (with few labelled tokens) use_label_mask false"
            )
        return forward_fn_dict(module, inputs)

    state = get_eva_state_dict(model, dataloader=batches, forward_fn=bounded_forward, show_progress_bar=False)
    own = digest([state[name] for name in sorted(state)])
    state = {name: state[name].contiguous() for name in sorted(state)}
    ranks = dist.broadcast(torch.tensor([t.shape[0] for t in state.values()], dtype=torch.int64, device=device))
    for (name, mine), rank in zip(list(state.items()), ranks.tolist()):
        if rank == 0:
            state[name] = mine.new_zeros((0, mine.shape[1]))
            continue
        theirs = mine if rank == mine.shape[0] else mine.new_empty((rank, mine.shape[1]))
        state[name] = dist.broadcast(theirs, src=0)
    chosen = {name.removeprefix("base_model.model."): int(t.shape[0]) for name, t in state.items()}
    initialize_lora_eva_weights(model, eva_state_dict=dict(state))  # (it pops what it loads)
    return chosen, forwards, own


def digest(tensors) -> str:
    """16 hex digits of SHA-256 over the tensors' shapes and bytes: equal digests, bit-identical tensors."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train(args) -> dict:
    from ds_dynrank.config import load_ds_config

    raw = load_ds_config(args.deepspeed)  # the config first, before DeepSpeed loads
    stage = check_stage(raw)
    lora_cfg, init = eva_settings(raw.pop("peft_eva", {}), args.task)
    raw.pop("dynrank", None)

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from peft import get_peft_model
    from transformers import set_seed

    from ds_dynrank import dist
    from ds_dynrank.ds_config import bf16_available, resolve
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.task import job
    from ds_dynrank.task.models import load_model_and_tokenizer
    from ds_dynrank.task.runtime import local_world_size, share_cpu_threads

    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    job.apply_gradient_checkpointing(model, args)
    data = job.build_data(args, tokenizer)
    dist.init(timeout_s=args.dist_timeout)
    run = RunDir(job.shared_output_dir(args, prefix="peft_eva_"))
    accel = get_accelerator()
    share_cpu_threads(accel.device_name(), local_world_size(dist.world_size()))
    ds_config = resolve(raw, max_steps=args.max_steps, output_dir=run.path, bf16_supported=bf16_available(accel))
    micro = ds_config["train_micro_batch_size_per_gpu"]
    batches = init_batches(data, args, init["init_batch_size"] or micro, init["init_batches"])

    accel.set_device(dist.local_rank())  # as DeepSpeed's engine will: this rank's device for PEFT's gathers
    device = accel.device_name(dist.local_rank())
    model.to(device)  # before the adapters: PEFT's SVD runs where the model is, and NCCL gathers device tensors
    try:  # PEFT's EVA example: adapters on the meta device until EVA writes them
        model = get_peft_model(model, lora_cfg, low_cpu_mem_usage=True)
    except ValueError as err:  # target_modules that match nothing
        raise UserInputError(f"peft_eva.target_modules: {err}") from None
    uniform = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start_init = time.time()
    ranks, forwards, own = eva_init(model, batches, init["init_max_forwards"], device)
    init_seconds = time.time() - start_init
    trainable = [p for n, p in sorted(model.named_parameters()) if p.requires_grad]
    # one write per line, so lines from ranks sharing one stdout do not interleave
    print(
        f"eva init digest {digest(trainable)} (rank {dist.rank()}; own SVD {own}, {forwards} forwards)\n",
        end="",
        flush=True,
    )

    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    baseline, final, history, seconds = job.train_peer(engine, data, args, desc="train (PEFT EVA)")
    metrics = job.peer_metrics(
        data,
        engine,
        baseline,
        final,
        history,
        seconds,
        trainable_parameters=sum(p.numel() for p in trainable),
        trainable_parameters_uniform=uniform,  # r on every module, before EVA moved rank
        zero_stage=stage,
        method="peft-eva",
        initial_budget=lora_cfg.r * len(ranks),
        final_budget=sum(ranks.values()),
        budget_unit="rank",
        eva={
            "rho": lora_cfg.eva_config.rho,
            "tau": lora_cfg.eva_config.tau,
            "use_label_mask": lora_cfg.eva_config.use_label_mask,
            "init_batches_per_rank": len(batches),
            "forwards": forwards,
            "seconds": round(init_seconds, 2),
            "modules_without_adapter": sorted(name for name, r in ranks.items() if r == 0),
        },
    )
    if dist.is_main():
        job.write_results(run, data, metrics)
        run.write_ranks(ranks)
        print(
            f"{job.summary(data, baseline, final)} after {engine.global_steps} steps; EVA's rank budget "
            f"{sum(ranks.values())} over {len(ranks)} modules ({min(ranks.values())}-{max(ranks.values())} each); "
            f"outputs in {run.path}"
        )
    dist.barrier()
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(train, None, __doc__.split("\n\n")[0]))
