"""Fine-tune a causal LM with ds_dynrank LoRA adapters under DeepSpeed (ZeRO 0-3): supervised fine-tuning on
instruction and chat data (the default), or label classification (--task classification).

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json          # 2 processes (CPU: gloo)
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero3.json
    python launch/train.py --deepspeed ds_configs/zero0.json                           # one process
    mpirun -np 2 python launch/train.py ...; srun python launch/train.py ...           # see launch/slurm/

Everything the user can get wrong (config, model, dataset, columns, checkpoint) is checked before DeepSpeed starts
(the model against its modules on the meta device); the weights load once the process group is up, in the
training precision, and under ZeRO-3 straight into each rank's partitions.
The loop is explicit: forward, backward, step, the allocator's after_step(), evaluation every --eval_interval
optimizer steps and at the end. `dynrank.engine` is read at every use: the physical backend replaces it at events.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from ds_dynrank.task.job import run_main  # noqa: E402


def check_inputs(args):
    """Every check that can fail on user input, before any process group or DeepSpeed engine exists. The config
    is checked first, before torch, transformers and DeepSpeed load: a typo is refused in about a second."""
    from ds_dynrank.config import check_deepspeed_compat, from_ds_config, load_ds_config

    ds_config = load_ds_config(args.deepspeed)
    cfg = from_ds_config(ds_config)
    check_deepspeed_compat(cfg, ds_config)

    from transformers import set_seed

    from ds_dynrank import checkpoint
    from ds_dynrank.inject import select_targets
    from ds_dynrank.launch_env import check_launch_env, launch_world_size
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.task import job
    from ds_dynrank.task.models import load_tokenizer, skeleton

    check_launch_env()
    resume, checkpoints = None, RunDir(args.output_dir or ".").checkpoints
    if args.resume == "auto":  # a requeued job: continue if an earlier attempt committed a checkpoint
        args.resume = "latest" if checkpoint.latest_tag(checkpoints) else None
    if args.resume:  # what the checkpoint alone can refuse, before the model and data load
        resume = checkpoint.resolve(args.resume, checkpoints)
        checkpoint.check_world_size(*resume, launch_world_size())
    set_seed(args.seed)
    model = skeleton(args.model)  # on the meta device: names, no weights, no memory
    modules = select_targets(model, cfg)
    job.check_gradient_checkpointing(model, args)
    data = job.build_data(args, load_tokenizer(args.model))
    validation = job.hold_out_validation(data, cfg, args.seed)
    if resume:
        checkpoint.check_resumable(*resume, method=cfg.method, modules=modules, world_size=launch_world_size())
    return ds_config, cfg, data, resume, validation


def train(args, stop=None) -> dict:
    from ds_dynrank.preemption import Preempted, StopRequest

    stop = stop or StopRequest().install()  # SIGTERM / SIGUSR1 from here on: a request to stop at a step boundary
    try:
        result = train_loop(args, stop)
    except Preempted:  # the handlers stay while the process exits 75: a launcher that sees a first rank leave
        raise  # SIGTERMs the rest (srun --kill-on-bad-exit, torchrun), which must still exit 75, not die of it
    except BaseException:
        stop.uninstall()
        raise
    stop.uninstall()
    return result


def train_loop(args, stop) -> dict:
    """The job itself: inputs checked, DeepSpeed up, the loop, the final evaluation, export and metrics."""
    ds_config, cfg, data, resume, validation = check_inputs(args)  # user input first
    import torch
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    import ds_dynrank
    from ds_dynrank import checkpoint, dist, holds, monitor
    from ds_dynrank.ds_config import bf16_available, resolve
    from ds_dynrank.errors import Preempted
    from ds_dynrank.export import serving_note
    from ds_dynrank.lora import ranks_by_name
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.task import job
    from ds_dynrank.task.models import load_model, training_dtype
    from ds_dynrank.task.runtime import local_world_size, return_freed_memory, share_cpu_threads

    dist.init(timeout_s=args.dist_timeout)
    run = RunDir(job.shared_output_dir(args))
    accel = get_accelerator()
    share_cpu_threads(accel.device_name(), local_world_size(dist.world_size()))
    return_freed_memory(accel.device_name())  # before the model: see task/runtime.py
    ds_config = resolve(ds_config, max_steps=args.max_steps, output_dir=run.path, bf16_supported=bf16_available(accel))
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config.get("gradient_accumulation_steps", 1)
    # in the training precision, and under ZeRO-3 partitioned as it is built: no rank holds the whole base model
    model = load_model(args.model, dtype=training_dtype(ds_config), ds_config=ds_config)
    job.apply_gradient_checkpointing(model, args)  # before the adapters go in
    items, collate = data.training_items()  # packed rows, or the examples
    dynrank = ds_dynrank.initialize(
        model,
        ds_config,
        total_steps=args.max_steps,
        steps_per_epoch=job.steps_per_epoch(len(items), micro, accumulation, dist.world_size()),
        output_dir=run.path,
        validation=validation,
        resume=resume,
    )
    allocated_initial = dynrank.allocated_parameters()
    if args.packing:  # before any step: a model whose attention lets packed examples see each other is refused
        job.check_packing_isolation(dynrank.engine, data)
    sampler, loader = job.train_loader(items, collate, args, micro)
    run_eval = job.evaluator(data)

    loop = {"epoch": 0, "batch": 0, "tokens": 0}  # where the next micro-batch comes from, tokens seen so far
    if resume:
        client = dynrank.client_state
        loop, history, baseline = {"tokens": 0, **client["loop"]}, client["eval_history"], client["baseline"]
        saved_world = checkpoint.read_meta(*resume)["world_size"]
        if saved_world != dist.world_size():  # universal: continue after the same number of samples of the epoch
            loop["batch"] = loop["batch"] * saved_world // dist.world_size()
    else:
        baseline = run_eval(dynrank.engine)
        history = [{"step": 0, **baseline}]

    base_model = dynrank.base_model() or str(args.model)

    def save_checkpoint() -> str:
        state, tag = (
            {"loop": dict(loop), "eval_history": history, "baseline": baseline},
            f"step{dynrank.engine.global_steps}",
        )
        meta, keep = {"base_model": base_model}, args.save_total_limit
        dynrank.save_checkpoint(run.checkpoints, tag, client_state=state, meta=meta, keep=keep)
        return tag

    bar = tqdm(
        total=args.max_steps,
        initial=dynrank.engine.global_steps,
        disable=not dist.is_main(),
        desc="train",
        dynamic_ncols=True,
    )
    start, window = time.time(), torch.zeros(3, dtype=torch.float64)  # loss sum, micro-batches, tokens
    while dynrank.engine.global_steps < args.max_steps:
        sampler.set_epoch(loop["epoch"])
        for index, batch in enumerate(loader):
            if index < loop["batch"]:
                continue  # consumed before the checkpoint we resumed from
            loop["batch"] = index + 1
            tokens = job.batch_tokens(batch)
            device = dynrank.engine.device
            loss = dynrank.engine(**{k: v.to(device) for k, v in batch.items()}).loss
            job.stop_on_non_finite(loss, dynrank.engine, run.checkpoints)  # collective: every rank stops together
            dynrank.engine.backward(loss)
            at_boundary = dynrank.engine.is_gradient_accumulation_boundary()
            dynrank.engine.step()
            event = dynrank.after_step()  # collective; re-allocates when the schedule says so
            if event:
                job.log_allocation(dynrank)
            if event and event["modules_changed"] and dist.is_main():
                active = f", {sum(event['active'].values())} modules active" if "active" in event else ""
                bar.write(
                    f"step {event['step']}: re-allocated {event['slots_changed']} slots in "
                    f"{event['modules_changed']} modules, budget {event['budget']} {event['budget_unit']}"
                    f"{active}"
                )
            window += torch.tensor([float(loss.detach()), 1.0, float(tokens)], dtype=torch.float64)
            if not at_boundary:
                continue
            engine = dynrank.engine
            loss_sum, micro_batches, step_tokens = dist.all_reduce_sum(window.to(device)).tolist()
            window.zero_()
            loop["tokens"] += int(step_tokens)
            mean_loss = loss_sum / micro_batches
            step, elapsed = engine.global_steps, time.time() - start
            train_values = {
                "train_loss": mean_loss,
                "samples_per_sec": engine.global_samples / elapsed,
                "tokens_seen": loop["tokens"],
                "tokens_per_sec": loop["tokens"] / elapsed,
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                train_values["grad_norm"] = float(grad_norm)
            monitor.write(engine.monitor, monitor.scalar_events("Train/Samples", train_values, engine.global_samples))
            del engine
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
                history.append({"step": step, **run_eval(dynrank.engine)})
            saved = args.save_interval and step % args.save_interval == 0 and step < args.max_steps
            if saved:
                save_checkpoint()
            holds.hold("step", step, release=lambda d=device: bool(stop.agreed(d)))  # tests signal the run here
            signalled = stop.agreed(device)  # collective: every rank stops at this same boundary, or none
            if signalled and step < args.max_steps:
                tag = f"step{step}" if saved else save_checkpoint()
                bar.close()
                here = f" ({stop.name} here)" if stop.signum is not None else ""
                raise Preempted(
                    f"a stop signal reached rank(s) {signalled}{here}; checkpoint {run.checkpoints / tag} is "
                    f"committed at step {step}. Continue with --resume (the shipped sbatch scripts requeue)"
                )
            if step >= args.max_steps:
                break
        else:
            loop = {**loop, "epoch": loop["epoch"] + 1, "batch": 0}
    bar.close()
    final = run_eval(dynrank.engine)
    history.append({"step": dynrank.engine.global_steps, **final})
    save_checkpoint()
    wall = time.time() - start
    metrics = {
        "task": data.task,
        "metric": data.headline,
        "value": final[data.headline],
        "baseline_value": baseline[data.headline],
        **final,  # eval_loss, and accuracy (classification) or perplexity, token_accuracy, exact_match (SFT)
        "baseline": baseline,  # the same metrics at step 0, before any training
        "eval_examples": data.eval_examples,
        "steps": dynrank.engine.global_steps,
        "samples": dynrank.engine.global_samples,
        "tokens": loop["tokens"],
        "wall_seconds": round(wall, 2),
        "trainable_parameters": dynrank.allocated_parameters(),  # the physical backend changes it
        "trainable_parameters_initial": allocated_initial,
        "trainable_parameters_active": dynrank.trainable_parameters(),  # live slots of modules that train
        "world_size": dist.world_size(),
        "zero_stage": dynrank.engine.zero_optimization_stage(),
        "method": cfg.method,
        "reallocation_events": len(dynrank.history) - 1,
        "final_budget": dynrank.budget_in_use(),
        "budget_unit": dynrank.bounds.unit,
        "serving": serving_note(ranks_by_name(dynrank.adapters)),  # also adapter/dynrank_serving.json
        "eval_history": history,
    }
    dynrank.export_adapter(run.adapter, base_model=base_model)  # collective
    if dist.is_main():
        job.write_results(run, data, metrics)
        print(
            f"{job.summary(data, baseline, final)} after {dynrank.engine.global_steps} steps in {wall:.0f} s; "
            f"outputs in {run.path}",
            flush=True,
        )
    # one write (text and newline together) so lines from ranks sharing one stdout (mpirun, srun) do not interleave
    print(f"allocation checksum {dynrank.checksum():016x} (rank {dist.rank()})\n", end="", flush=True)
    dist.barrier()
    return metrics


if __name__ == "__main__":
    from ds_dynrank.preemption import EXIT_PREEMPTED, StopRequest

    early = StopRequest().install()  # before torch loads: a stop signalled during start-up is kept for step 1
    code = run_main(functools.partial(train, stop=early), None, __doc__.split("\n\n")[0])
    if code == EXIT_PREEMPTED:  # the checkpoint is committed and the logs flushed: leave now, before Python's
        sys.stdout.flush()  # shutdown restores SIGTERM's default action, so a launcher that stops the other ranks
        sys.stderr.flush()  # when the first one leaves (srun --kill-on-bad-exit, torchrun) gets 75 from each
        os._exit(code)
    sys.exit(code)
