"""Fine-tune a causal LM with ds_dynrank LoRA adapters under DeepSpeed (ZeRO 0-3).

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json          # 2 processes (CPU: gloo)
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero3.json
    python launch/train.py --deepspeed ds_configs/zero0.json                           # one process
    mpirun -np 2 python launch/train.py ...; srun python launch/train.py ...           # see launch/slurm/

Everything the user can get wrong (config, model, dataset, columns) is checked before DeepSpeed starts. The loop is
explicit: forward, engine.backward, engine.step, evaluation every --eval_interval optimizer steps and at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from ds_dynrank.errors import NonFiniteLossError, UserInputError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"), help="DeepSpeed JSON config path")
    p.add_argument("--model", default=None, help="HF hub name, local directory or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--dataset", default=None, help="hub name or local json/csv/parquet/dir (default: MR polarity)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--prompt_template", default=None, help="prompt with {text}; the label name is the answer")
    p.add_argument("--max_length", type=int, default=96, help="tokens per example, prompt and label together")
    p.add_argument("--max_steps", type=int, default=60, help="optimizer steps (gradient-accumulation boundaries)")
    p.add_argument("--eval_interval", type=int, default=30, help="evaluate every N optimizer steps (0: only at end)")
    p.add_argument("--eval_samples", type=int, default=300, help="held-out examples to evaluate (0: all)")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--output_dir", default=None, help="default: runs/<timestamp>")
    p.add_argument("--save_interval", type=int, default=0, help="checkpoint every N optimizer steps (0: only at end)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint: 'latest' in --output_dir (the default), a checkpoint root or tag",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist_timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("max_steps", "eval_batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.resume == "latest" and not args.output_dir:
        raise UserInputError("--resume: resuming the latest checkpoint needs the run's --output_dir")
    for name in ("eval_interval", "eval_samples", "save_interval"):
        if getattr(args, name) < 0:
            raise UserInputError(f"--{name}: must be >= 0, got {getattr(args, name)}")
    return args


def prepare(args: argparse.Namespace):
    """Every check that can fail on user input, before any process group or DeepSpeed engine exists. The config
    is checked first, before torch, transformers and DeepSpeed load: a typo is refused in about a second."""
    from ds_dynrank.config import check_deepspeed_compat, from_ds_config, load_ds_config

    ds_config = load_ds_config(args.deepspeed)
    dyn_cfg = from_ds_config(ds_config)
    check_deepspeed_compat(dyn_cfg, ds_config)

    import torch
    from transformers import set_seed

    from ds_dynrank import checkpoint
    from ds_dynrank.data import build_task
    from ds_dynrank.dist import check_launch_env
    from ds_dynrank.inject import inject_lora
    from ds_dynrank.models import load_model_and_tokenizer
    from ds_dynrank.reshape import resize_to

    check_launch_env()
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    task = build_task(
        tokenizer,
        args.dataset,
        text_column=args.text_column,
        label_column=args.label_column,
        template=args.prompt_template,
        max_length=args.max_length,
        max_eval_samples=args.eval_samples or None,
    )
    validation = hold_out_validation(task, dyn_cfg, args.seed)
    adapters = inject_lora(model, dyn_cfg)
    resume = None
    if args.resume:
        root, tag = checkpoint.resolve(args.resume, Path(args.output_dir or ".") / "checkpoints")
        ranks = checkpoint.saved_allocation(root, tag, dyn_cfg.method)
        checkpoint.check_world_size(root, tag, int(os.environ.get("WORLD_SIZE", "1")))
        if sorted(ranks) != [name for name, _ in adapters]:
            raise UserInputError(f"--resume: checkpoint {root / tag} adapts other modules than this model and config")
        if dyn_cfg.dynamic and dyn_cfg.reshape.backend == "physical":
            adapters = resize_to(model, adapters, ranks)  # shapes must match before DeepSpeed loads the state
            active = checkpoint.saved_activity(root, tag)
            for name, layer in adapters:  # module allocation: inactive adapters are buffers, not parameters
                layer.set_trainable(active.get(name, True), as_buffers=True)
        resume = (root, tag)
    return ds_config, dyn_cfg, model, task, adapters, resume, validation


def hold_out_validation(task, dyn_cfg, seed: int) -> dict | None:
    """ALoRA's fixed scoring batch: `alora.val_samples` training examples drawn with the run's seed (the same on
    every rank) and removed from training, so the allocation never looks at the evaluation split."""
    if dyn_cfg.method != "alora":
        return None
    import torch

    from ds_dynrank.data import collate_train

    n = dyn_cfg.alora.val_samples
    if n >= len(task.train):
        raise UserInputError(f"dynrank.alora.val_samples: {n} leaves no training data ({len(task.train)} examples)")
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:n])
    batch = collate_train([task.train[i] for i in order[:n]], task.candidate_ids, task.pad_id)
    task.train = [e for i, e in enumerate(task.train) if i not in chosen]
    return batch


def shared_output_dir(args: argparse.Namespace) -> Path:
    """One directory for all ranks: rank 0's timestamp is broadcast."""
    import torch

    from ds_dynrank import dist

    stamp = torch.tensor([int(datetime.now().strftime("%Y%m%d%H%M%S"))], dtype=torch.int64)
    stamp = dist.broadcast(stamp, src=0)
    return Path(args.output_dir or REPO / "runs" / str(stamp.item()))


def train(args: argparse.Namespace) -> dict:
    ds_config, dyn_cfg, model, task, adapters, resume, validation = prepare(args)  # user input first
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    from ds_dynrank import checkpoint, dist, monitor, outputs
    from ds_dynrank.data import collate_train
    from ds_dynrank.ds_config import resolve
    from ds_dynrank.evaluation import evaluate
    from ds_dynrank.export import export_settings, from_adapters, gather_full, write_peft_adapter
    from ds_dynrank.hook import DynRank, optimizer_groups
    from ds_dynrank.lora import lora_parameters
    from ds_dynrank.methods import build_method
    from ds_dynrank.runtime import bf16_available, local_world_size, share_cpu_threads
    from ds_dynrank.schedule import check_fits
    from ds_dynrank.zero import full_numel

    dist.init(timeout_s=args.dist_timeout)
    output_dir = shared_output_dir(args)
    accel = get_accelerator()
    share_cpu_threads(accel.device_name(), local_world_size(dist.world_size()))
    bf16 = bf16_available(accel)
    ds_config = resolve(ds_config, max_steps=args.max_steps, output_dir=output_dir, bf16_supported=bf16)
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config.get("gradient_accumulation_steps", 1)
    per_rank = len(task.train) // dist.world_size()  # DistributedSampler(drop_last=True), then micro-batches
    steps_per_epoch = max(1, -(-per_rank // micro) // accumulation)  # len(loader) // accumulation
    if dyn_cfg.dynamic:  # before DeepSpeed writes anything: a schedule that never fires would train plain LoRA
        check_fits(build_method(dyn_cfg).schedule(args.max_steps, steps_per_epoch), args.max_steps, dyn_cfg.method)
    universal = resume is not None and checkpoint.is_universal(*resume)
    if universal:  # DeepSpeed re-partitions the whole fp32 values and moments for this number of processes
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    groups = optimizer_groups(dyn_cfg, adapters, fresh=resume is None)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    trainable_initial = sum(full_numel(p) for p in lora_parameters(model))
    sampler = DistributedSampler(
        task.train, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        task.train,
        batch_size=engine.train_micro_batch_size_per_gpu(),
        sampler=sampler,
        collate_fn=lambda b: collate_train(b, task.candidate_ids, task.pad_id),
        generator=torch.Generator().manual_seed(args.seed),  # iter() draws from it, not from dropout's global RNG
    )
    dynrank = DynRank(engine, dyn_cfg, adapters, total_steps=args.max_steps, output_dir=output_dir,
                      ds_config=ds_config, steps_per_epoch=steps_per_epoch, validation=validation)  # fmt: skip

    def run_eval() -> dict[str, float]:
        engine = dynrank.engine  # the physical backend replaces the engine at its events
        engine.eval()
        result = evaluate(engine, task, batch_size=args.eval_batch_size, device=engine.device)
        engine.train()
        monitor.write(engine.monitor, monitor.scalar_events("Eval", result, engine.global_samples))
        return result

    loop = {"epoch": 0, "batch": 0}  # where the next micro-batch comes from: resumed runs see the same data
    if resume:
        _, client = engine.load_checkpoint(str(resume[0]), tag=resume[1], load_module_strict=False)
        if client is None:
            raise UserInputError(f"--resume: DeepSpeed could not load {resume[0] / resume[1]}")
        if universal:
            checkpoint.restore_universal_buffers(engine.module, *resume)
        dynrank.load_state_dict(client["dynrank"])
        loop, history, baseline = client["loop"], client["eval_history"], client["baseline"]
        if universal:  # another number of processes: continue after the same number of samples of the epoch
            saved_world = checkpoint.read_meta(*resume)["world_size"]
            loop = {"epoch": loop["epoch"], "batch": loop["batch"] * saved_world // dist.world_size()}
        checkpoint.restore_rng(*resume)  # (a universal checkpoint has no per-rank RNG: fresh streams)
    else:
        baseline = run_eval()
        history = [{"step": 0, **baseline}]

    base_model = getattr(model, "name_or_path", None) or str(args.model)

    def save_checkpoint() -> None:
        client = {"dynrank": dynrank.state_dict(), "loop": dict(loop), "eval_history": history, "baseline": baseline}
        meta = {"method": dyn_cfg.method, "base_model": base_model, "world_size": dist.world_size(),
                **export_settings(dynrank.adapters),
                "ranks": outputs.allocation(dynrank.adapters),
                "active": outputs.activity(dynrank.adapters),
                "scaling": {name: layer.scaling for name, layer in dynrank.adapters}}  # fmt: skip
        checkpoint.save(dynrank.engine, output_dir / "checkpoints", f"step{dynrank.engine.global_steps}", client, meta)

    bar = tqdm(total=args.max_steps, initial=engine.global_steps, disable=not dist.is_main(), desc="train",
               dynamic_ncols=True)  # fmt: skip
    start, window_loss, window_micro = time.time(), torch.zeros(1), 0
    while engine.global_steps < args.max_steps:
        sampler.set_epoch(loop["epoch"])
        for index, batch in enumerate(loader):
            if index < loop["batch"]:
                continue  # consumed before the checkpoint we resumed from
            loop["batch"] = index + 1
            engine = dynrank.engine  # replaced by a physical re-allocation event
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
            stop_on_non_finite(loss, engine, output_dir)  # collective: every rank stops together, before stepping
            engine.backward(loss + dynrank.penalty())
            at_boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            event = dynrank.after_step()  # collective; re-allocates when the schedule says so
            engine = dynrank.engine
            if event and event["modules_changed"] and dist.is_main():
                active = f", {sum(event['active'].values())} modules active" if "active" in event else ""
                bar.write(f"step {event['step']}: re-allocated {event['slots_changed']} slots in "
                          f"{event['modules_changed']} modules, budget {event['budget']} {event['budget_unit']}"
                          f"{active}")  # fmt: skip
            window_loss += loss.detach().float().cpu()
            window_micro += 1
            if not at_boundary:
                continue
            mean_loss = (dist.all_reduce_sum(window_loss.to(engine.device)) / (window_micro * dist.world_size())).item()
            window_loss, window_micro = torch.zeros(1), 0
            step, elapsed = engine.global_steps, time.time() - start
            train_values = {"train_loss": mean_loss, "samples_per_sec": engine.global_samples / elapsed}
            monitor.write(engine.monitor, monitor.scalar_events("Train/Samples", train_values, engine.global_samples))
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
                history.append({"step": step, **run_eval()})
            if args.save_interval and step % args.save_interval == 0 and step < args.max_steps:
                save_checkpoint()
            if step >= args.max_steps:
                break
        else:
            loop = {"epoch": loop["epoch"] + 1, "batch": 0}
    bar.close()
    engine = dynrank.engine
    final = run_eval()
    history.append({"step": engine.global_steps, **final})
    save_checkpoint()
    wall = time.time() - start
    metrics = {
        "metric": "accuracy",
        "value": final["accuracy"],
        "baseline_value": baseline["accuracy"],
        "eval_loss": final["eval_loss"],
        "eval_examples": len(task.eval),
        "steps": engine.global_steps,
        "samples": engine.global_samples,
        "wall_seconds": round(wall, 2),
        "trainable_parameters": sum(full_numel(p) for p in lora_parameters(engine.module)),  # physical: changes
        "trainable_parameters_initial": trainable_initial,
        "trainable_parameters_active": dynrank.trainable_parameters(),  # live slots of modules that train
        "world_size": dist.world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "method": dyn_cfg.method,
        "reallocation_events": len(dynrank.history) - 1,
        "final_budget": dynrank.budget_in_use(),
        "budget_unit": dynrank.bounds.unit,
        "eval_history": history,
    }
    full = gather_full(dynrank.adapters)  # collective: every rank takes part
    if dist.is_main():
        outputs.write_json(output_dir / "metrics.json", metrics)
        write_peft_adapter(output_dir / "adapter", from_adapters(dynrank.adapters, full), base_model=base_model,
                           **export_settings(dynrank.adapters))  # fmt: skip
        print(
            f"accuracy {final['accuracy']:.4f} (untrained {baseline['accuracy']:.4f}) after {engine.global_steps} "
            f"steps in {wall:.0f} s; outputs in {output_dir}",
            flush=True,
        )
    # one write (text and newline together) so lines from ranks sharing one stdout (mpirun, srun) do not interleave
    print(f"allocation checksum {allocation_checksum(dynrank.adapters)} (rank {dist.rank()})\n", end="", flush=True)
    dist.barrier()
    return metrics


def stop_on_non_finite(loss, engine, output_dir: Path) -> None:
    """A NaN or Inf loss on any rank stops every rank before the step is applied, so the adapters are not poisoned
    and the last checkpoint stays the last good state."""
    import torch

    from ds_dynrank import dist
    from ds_dynrank.errors import NonFiniteLossError

    bad = dist.ranks_where(not bool(torch.isfinite(loss.detach()).all()), device=engine.device)
    if bad:
        latest = output_dir / "checkpoints" / "latest"
        last = f"{output_dir / 'checkpoints'}/{latest.read_text().strip()}" if latest.is_file() else "none written"
        raise NonFiniteLossError(
            f"loss is not finite (NaN or Inf) on rank(s) {bad} at optimizer step "
            f"{engine.global_steps + 1}; stopped before applying it. Last good checkpoint: {last}"
        )


def allocation_checksum(adapters) -> str:
    """A short digest of {module: live rank}, printed by every rank so multi-node logs can be compared."""
    import hashlib
    import json

    from ds_dynrank.outputs import allocation

    return hashlib.sha256(json.dumps(allocation(adapters)).encode()).hexdigest()[:16]


def _launch_rank() -> int:
    """This process's rank as the launcher (deepspeed, torchrun, mpirun, srun) told it, before any process group."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except UserInputError as err:
        if _launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as err:
        if _launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except RuntimeError as err:
        from ds_dynrank.dist import is_collective_failure

        if not is_collective_failure(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"error: rank {_launch_rank()}: a collective failed: a peer process died or stopped responding "
              f"(within --dist_timeout). Checkpoints already committed are intact; resume with --resume. "
              f"[{first}]", file=sys.stderr, flush=True)  # fmt: skip
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
