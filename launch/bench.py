"""Cost benchmark: vanilla LoRA and the dynamic methods side by side, same model, same data, same process group.

    deepspeed --num_gpus 2 launch/bench.py --deepspeed ds_configs/zero2.json --steps 30

Prints, for each variant, ratios against LoRA measured in this run: whole-run time per optimizer step (events
included) and training tokens per second, one re-allocation event's cost in LoRA steps, adapter + optimizer bytes
before and after training, bytes handed to collectives per event (and per ordinary step, by the method's own
hooks), and resident memory before, after and at its peak while training, and at its peak while building the model
and the engine, each the largest over the processes (device memory too on an accelerator). The model is built as
the main job builds it: in the training precision, and partitioned under ZeRO-3. `--model` may be a directory
holding only a config.json (benchmarks/models/: random weights of a real model's shape). On an accelerator with
bf16 the configs' `"bf16": {"enabled": "auto"}` turns it on, as in the main job.
Writes the numbers to --out (JSON). Timings are never asserted anywhere: they are for reading.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASELINE = "lora"
BACKENDS = ("masked", "physical")
SHARED = ("target_modules", "exclude_modules", "r", "rank_pattern", "lora_alpha", "alpha_pattern", "lora_dropout")


def variants() -> tuple[str, ...]:
    """LoRA, then every dynamic method of the registry on both backends: `<method>-<backend>`."""
    from ds_dynrank.methods.registry import SPECS

    return (BASELINE, *(f"{name}-{b}" for name, spec in SPECS.items() if spec.dynamic for b in BACKENDS))


def variant_section(variant: str, base: dict, args) -> dict:
    """The "dynrank" section of one variant: the config's LoRA shape, the variant's method and backend, the
    method's own settings for acting every --interval steps, then the variant's `+key=value` overrides."""
    from ds_dynrank.methods.registry import spec
    from ds_dynrank.tools.overrides import apply_overrides, split_overrides

    name, overrides = split_overrides(variant, "--variants")
    section = {k: base[k] for k in SHARED if k in base}
    if args.target_modules:
        section["target_modules"] = args.target_modules.split(",")
    if args.r:
        section["r"] = args.r
    if name == BASELINE:
        return {"method": BASELINE, **section}
    method, backend = name.rsplit("-", 1)
    section = {"method": method, **section, "reshape": {"backend": backend}, **spec(method).every(args.interval)}
    return apply_overrides(section, method, overrides)


def adapter_bytes(model) -> int:
    """Working copy + fp32 master + two Adam moments of every adapter parameter, as allocated (live or not), plus
    the working copy of adapters held as buffers (inactive modules under physical module allocation)."""
    import torch

    from ds_dynrank.lora import adapter_state_tensors, iter_lora
    from ds_dynrank.zero import full_numel

    tensors = adapter_state_tensors(iter_lora(model))
    working = sum(full_numel(t) * t.element_size() for t in tensors)
    return working + 3 * 4 * sum(full_numel(t) for t in tensors if isinstance(t, torch.nn.Parameter))


def host_memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process: /proc's VmRSS and VmHWM, where Linux has them."""
    import psutil

    fields = {}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    rss = fields["VmRSS"] if "VmRSS" in fields else psutil.Process().memory_info().rss
    return rss, fields.get("VmHWM", rss)


def per_rank_max(values, device):
    """The element-wise maximum over every rank (one all-gather)."""
    import torch

    from ds_dynrank import dist

    return torch.stack(dist.all_gather(values.to(device))).amax(dim=0).cpu().tolist()


def reset_peak_memory() -> None:
    """Start a fresh peak for the next variant: Linux resets VmHWM on "5" to clear_refs; the accelerator its own."""
    from deepspeed.accelerator import get_accelerator

    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then spans the whole process
        Path("/proc/self/clear_refs").write_text("5")
    get_accelerator().reset_peak_memory_stats()


def device_peak() -> int | None:
    """Peak device memory since the last reset, on an accelerator (the host numbers cover the CPU)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return None if accelerator.device_name() == "cpu" else int(accelerator.max_memory_allocated())


def run_variant(name: str, args, base_cfg: dict, batches: list, scoring_pool: list, task) -> dict:
    import torch
    from tqdm import tqdm

    import ds_dynrank
    from ds_dynrank import dist
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.task.classification import collate_train
    from ds_dynrank.task.models import load_model, training_dtype
    from ds_dynrank.zero.engine import teardown

    ds_config = copy.deepcopy(base_cfg)
    ds_config["dynrank"] = variant_section(name, base_cfg.get("dynrank", {}), args)
    ds_config.pop("tensorboard", None)
    n_scoring = from_ds_config(ds_config).validation_samples  # a method's fixed scoring batch, the same on every rank
    validation = collate_train(scoring_pool[-n_scoring:], task.candidate_ids, task.pad_id) if n_scoring else None
    torch.manual_seed(0)
    reset_peak_memory()  # the peak of building the model and the engine, as the main job builds them
    model = load_model(args.model, dtype=training_dtype(ds_config), ds_config=ds_config)
    dynrank = ds_dynrank.initialize(model, ds_config, total_steps=args.steps + args.warmup, validation=validation)
    _, load_peak_rss = host_memory()
    bytes_before = adapter_bytes(model)
    reset_peak_memory()  # the peak from here on: training and events, not loading
    rss_before, _ = host_memory()
    step_times, event_comm, step_comm, tokens = [], [], [], 0
    bar = tqdm(total=args.steps + args.warmup, desc=name, disable=not dist.is_main(), dynamic_ncols=True)
    for i in range(args.steps + args.warmup):
        batch = batches[i % len(batches)]
        dist.barrier()
        start = time.perf_counter()
        device = dynrank.engine.device
        loss = dynrank.engine(**{k: v.to(device) for k, v in batch.items()}).loss
        dynrank.engine.backward(loss)
        dynrank.engine.step()
        events_so_far = len(dynrank.history)
        with dist.counting_bytes() as sent:
            dynrank.after_step()  # the physical backend rebuilds the engine at events
        (event_comm if len(dynrank.history) > events_so_far else step_comm).append(sent.bytes)
        dist.barrier()
        if i >= args.warmup:
            step_times.append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
        bar.update(1)
    bar.close()
    events = dynrank.history[1:]
    tokens = int(dist.all_reduce_sum(torch.tensor([tokens], device=dynrank.engine.device)).item())
    rss_after, peak_rss = host_memory()
    peak_rss = max(peak_rss, rss_before, rss_after)  # the kernel updates VmHWM lazily: a few pages can be missing
    # the largest process's: memory limits are per process, and under ZeRO-3 rank 0 alone reads the weights
    memory = torch.tensor([rss_before, rss_after, peak_rss, load_peak_rss], dtype=torch.float64)
    rss_before, rss_after, peak_rss, load_peak_rss = (int(v) for v in per_rank_max(memory, dynrank.engine.device))
    result = {
        "variant": name,
        "steps": len(step_times),
        "seconds_per_step": sum(step_times) / len(step_times),
        "tokens_per_second": tokens / sum(step_times),  # every process's non-pad tokens, events included
        "events": len(events),
        "event_seconds": sum(e["seconds"] for e in events) / len(events) if events else 0.0,
        "slots_changed": sum(e["slots_changed"] for e in events),
        "bytes_before": bytes_before,
        "bytes_after": adapter_bytes(dynrank.engine.module),
        "event_comm_bytes": sum(event_comm) / len(event_comm) if event_comm else 0.0,
        "step_comm_bytes": sum(step_comm) / len(step_comm) if step_comm else 0.0,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "peak_rss": peak_rss,
        "load_peak_rss": load_peak_rss,
        "base_dtype": str(training_dtype(ds_config)).removeprefix("torch."),
        "device_peak": device_peak(),
        "budget": dynrank.budget_in_use(),
        "trainable_parameters": dynrank.trainable_parameters(),
        "final_loss": float(loss.item()),
    }
    teardown(dynrank.engine)  # destroy() alone leaves ZeRO-3's hooks holding the model: the next variant pays
    del dynrank, model
    gc.collect()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before measuring")
    p.add_argument("--interval", type=int, default=5, help="optimizer steps between re-allocation events")
    p.add_argument("--target_modules", default=None, help="comma-separated override of the config's targets")
    p.add_argument("--r", type=int, default=None, help="override of the config's rank")
    p.add_argument(
        "--variants",
        default=",".join(variants()),
        help=f"any of {', '.join(variants())}, each with optional +key=value overrides of its "
        "method's section (l1ra-masked+l1_lambda=0.05)",
    )
    p.add_argument("--out", default=str(REPO / "runs" / "bench_cost.json"))
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    from ds_dynrank import dist
    from ds_dynrank.config import load_ds_config
    from ds_dynrank.ds_config import bf16_available, resolve
    from ds_dynrank.task.classification import build_task, collate_train
    from ds_dynrank.task.models import load_tokenizer

    dist.init()
    from deepspeed.accelerator import get_accelerator

    from ds_dynrank.task.runtime import local_world_size, return_freed_memory, share_cpu_threads

    accel = get_accelerator()
    share_cpu_threads(accel.device_name(), local_world_size(dist.world_size()))
    return_freed_memory(accel.device_name())
    base = resolve(
        load_ds_config(args.deepspeed),
        max_steps=args.steps + args.warmup,
        output_dir=Path(args.out).parent,
        bf16_supported=bf16_available(accel),
    )
    task = build_task(load_tokenizer(args.model), args.dataset, max_eval_samples=1)
    micro = base["train_micro_batch_size_per_gpu"]
    offset = dist.rank() * micro
    batches = [
        collate_train(task.train[offset + i * micro * dist.world_size() :][:micro], task.candidate_ids, task.pad_id)
        for i in range(args.steps + args.warmup)
    ]
    known = variants()
    unknown = [v for v in args.variants.split(",") if v.split("+")[0] not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    results = [run_variant(v, args, base, batches, task.train, task) for v in args.variants.split(",")]
    if dist.is_main():
        lora = next(r for r in results if r["variant"] == BASELINE)
        print(
            f"\n{'variant':<18} {'s/step':>8} {'x LoRA':>7} {'tokens/s':>9} {'x LoRA':>7} {'events':>6} "
            f"{'event (LoRA steps)':>18} "
            f"{'slots moved':>11} {'bytes before':>13} {'bytes after':>12} {'x LoRA':>7} "
            f"{'trainable':>10}"
        )
        for r in results:
            r["step_time_ratio"] = r["seconds_per_step"] / lora["seconds_per_step"]
            r["tokens_per_second_ratio"] = r["tokens_per_second"] / lora["tokens_per_second"]
            r["event_cost_steps"] = r["event_seconds"] / lora["seconds_per_step"]
            r["bytes_ratio"] = r["bytes_after"] / lora["bytes_after"]
            r["peak_rss_ratio"] = r["peak_rss"] / lora["peak_rss"]
            print(
                f"{r['variant']:<18} {r['seconds_per_step']:>8.3f} {r['step_time_ratio']:>7.3f} "
                f"{r['tokens_per_second']:>9.0f} {r['tokens_per_second_ratio']:>7.3f} {r['events']:>6} "
                f"{r['event_cost_steps']:>18.2f} {r['slots_changed']:>11} {r['bytes_before']:>13,} "
                f"{r['bytes_after']:>12,} {r['bytes_ratio']:>7.2f} {r['trainable_parameters']:>10,}"
            )
        mib = 2**20
        print(
            f"\n{'variant':<18} {'comm/event (B)':>15} {'comm/step (B)':>14} {'RSS before (MiB)':>16} "
            f"{'RSS after':>10} {'peak RSS':>9} {'x LoRA':>7} {'load peak':>10} {'device peak (MiB)':>17}"
        )
        for r in results:
            device = "-" if r["device_peak"] is None else f"{r['device_peak'] / mib:.0f}"
            print(
                f"{r['variant']:<18} {r['event_comm_bytes']:>15,.0f} {r['step_comm_bytes']:>14,.0f} "
                f"{r['rss_before'] / mib:>16.0f} {r['rss_after'] / mib:>10.0f} {r['peak_rss'] / mib:>9.0f} "
                f"{r['peak_rss_ratio']:>7.2f} {r['load_peak_rss'] / mib:>10.0f} {device:>17}"
            )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
        print(f"\nwritten to {args.out}")
    dist.shutdown()  # every rank waits for the table; then the group is left before the interpreter's teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())
