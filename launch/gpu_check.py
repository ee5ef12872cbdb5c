"""The GPU check (issue 24): every method's cost on one GPU against LoRA in the same run, on random-initialised
models shaped like Qwen2.5-0.5B and Qwen2.5-1.5B (benchmarks/models/*/config.json), in bf16, in about 8 minutes on
an H200.

    bash launch/gpu_check.sh                      # on the device machine: installs the carried wheels, runs this
    python launch/gpu_check.py --smoke            # here: the same path on the CPU, a tiny config, about a minute

For each shape and variant (LoRA, then every dynamic method on both backends) it measures:
- tokens/s over the steps without an event, and the ratio to LoRA's;
- one event's cost, in ms and in LoRA steps (events forced every --event_every steps);
- tokens/s over a run with the method's shipped schedule (--shipped_steps long): the steady step time, plus one
  event's cost at each event that schedule fires, against LoRA over the same steps;
- peak device memory;
- model FLOPs utilisation: 4 x base parameters x tokens/s (forward 2N, backward 2N: the frozen base needs no
  weight gradients; attention's own FLOPs left out) over the card's bf16 matmul rate, measured here too (the
  mean of ten 8192^3 products after three warm-ups).
Writes gpu_check.json (everything) and prints one table per shape. Timings are for reading, never asserted.
Random weights are enough: cost does not depend on them, and the pretrained model (98 MB) cannot travel.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import BASELINE, adapter_bytes, variant_section, variants  # noqa: E402  (launch/bench.py, beside us)

SHAPES = ("qwen2.5-0.5b", "qwen2.5-1.5b")  # benchmarks/models/<name>/config.json
SMOKE_SHAPE = ("tiny",)
TARGETS = {"lora_mfu": 0.30, "dynamic_tokens_ratio": 0.97, "masked_event_steps": 0.5, "physical_event_steps": 3.0}


def matmul_rate(device, dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of one n^3 matrix product on random data: the mean of `repeats` timed products after 3 warm-ups."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    accel.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    accel.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def build_model(model_dir: Path, dtype, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_batches(vocab: int, micro: int, seq: int, count: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def shipped_events(section: dict, total_steps: int) -> int:
    """How many events the method's shipped schedule fires in a run of `total_steps` (one epoch)."""
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.methods.base import build_method

    cfg = from_ds_config({"dynrank": section})
    if not cfg.dynamic:
        return 0
    return len(build_method(cfg, validation={}).schedule(total_steps, total_steps).events())


def run_variant(name: str, args, shape_dir: Path, base_cfg: dict, batches: list, validation: dict) -> dict:
    import torch
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    import ds_dynrank
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.zero.engine import teardown

    accel = get_accelerator()
    ds_config = copy.deepcopy(base_cfg)
    section = ds_config["dynrank"] = variant_section(name, base_cfg["dynrank"], args)
    shipped = {k: v for k, v in section.items() if k not in ("schedule", section["method"])}  # without every()
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    model = build_model(shape_dir, dtype, accel.current_device_name())
    base_parameters = sum(p.numel() for p in model.parameters())
    n_scoring = from_ds_config(ds_config).validation_samples  # ALoRA scores on a fixed batch of this many rows
    scoring = {k: v[:n_scoring] for k, v in validation.items()} if n_scoring else None
    total = args.warmup + args.steps
    dynrank = ds_dynrank.initialize(model, ds_config, total_steps=total, validation=scoring)
    accel.reset_peak_memory_stats()
    step_times, event_steps, tokens = [], [], 0
    bar = tqdm(total=total, desc=f"{shape_dir.name} {name}", dynamic_ncols=True)
    for i in range(total):
        batch = batches[i % len(batches)]
        accel.synchronize()
        start = time.perf_counter()
        engine = dynrank.engine  # the physical backend replaces it at its events
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        events_before = len(dynrank.history)
        dynrank.after_step()
        accel.synchronize()
        if i >= args.warmup:
            (event_steps if len(dynrank.history) > events_before else step_times).append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
        bar.update(1)
    bar.close()
    events = dynrank.history[1:]
    steady = statistics.median(step_times)
    result = {
        "variant": name,
        "timed_steps": len(step_times),
        "seconds_per_step": steady,
        "tokens_per_second": int(batches[0]["attention_mask"].sum()) / steady,
        "events": len(events),
        "event_seconds": statistics.mean(e["seconds"] for e in events) if events else 0.0,
        "event_step_seconds": statistics.mean(event_steps) if event_steps else 0.0,
        "slots_changed": sum(e["slots_changed"] for e in events),
        "shipped_events": shipped_events(shipped, args.shipped_steps),
        "device_peak_bytes": accel.max_memory_allocated(),
        "adapter_bytes": adapter_bytes(dynrank.engine.module),
        "base_parameters": base_parameters,
        "trainable_parameters": dynrank.trainable_parameters(),
        "final_loss": float(loss.item()),
    }
    teardown(dynrank.engine)  # destroy() alone leaves ZeRO-3's hooks holding the model: the next variant pays
    del dynrank, engine, model
    gc.collect()
    accel.empty_cache()
    return result


def ratios(results: list[dict], rate: float, shipped_steps: int) -> None:
    """Everything against LoRA of the same shape, in place."""
    lora = next(r for r in results if r["variant"] == BASELINE)
    for r in results:
        r["tokens_per_second_ratio"] = r["tokens_per_second"] / lora["tokens_per_second"]
        r["event_ms"] = 1000 * r["event_seconds"]
        r["event_cost_steps"] = r["event_seconds"] / lora["seconds_per_step"]
        run = shipped_steps * r["seconds_per_step"] + r["shipped_events"] * r["event_seconds"]
        r["shipped_run_tokens_ratio"] = shipped_steps * lora["seconds_per_step"] / run
        r["mfu"] = 4 * r["base_parameters"] * r["tokens_per_second"] / rate


def print_table(shape: str, results: list[dict]) -> None:
    gib = 2**30
    print(
        f"\n{shape}: {'variant':<18} {'tokens/s':>10} {'x LoRA':>7} {'MFU':>6} {'event ms':>9} {'LoRA steps':>10} "
        f"{'shipped events':>14} {'shipped x LoRA':>14} {'peak GiB':>9}"
    )
    for r in results:
        print(
            f"{'':<{len(shape) + 2}}{r['variant']:<18} {r['tokens_per_second']:>10.0f} "
            f"{r['tokens_per_second_ratio']:>7.3f} {r['mfu']:>6.3f} {r['event_ms']:>9.1f} "
            f"{r['event_cost_steps']:>10.2f} {r['shipped_events']:>14} {r['shipped_run_tokens_ratio']:>14.3f} "
            f"{r['device_peak_bytes'] / gib:>9.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same path on the CPU with a tiny config")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    p.add_argument("--variants", default=",".join(variants()), help="LoRA first; see launch/bench.py")
    p.add_argument("--micro_batch", type=int, default=None, help="sequences per step (default 8; smoke 2)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 1024; smoke 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 16; smoke 4)")
    p.add_argument("--event_every", type=int, default=None, help="steps between forced events (default 8; smoke 2)")
    p.add_argument("--shipped_steps", type=int, default=1000, help="the run length the shipped schedules assume")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    args = p.parse_args(argv)
    small = args.smoke
    args.micro_batch = args.micro_batch or (2 if small else 8)
    args.seq_len = args.seq_len or (32 if small else 1024)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    args.steps = args.steps or (4 if small else 16)
    args.interval = args.event_every or (2 if small else 8)  # the name launch/bench.py's variant_section reads
    args.target_modules, args.r = None, None
    shapes = SMOKE_SHAPE if small else tuple(args.shapes.split(",") if args.shapes else SHAPES)
    unknown = [s for s in shapes if not (REPO / "benchmarks" / "models" / s / "config.json").is_file()]
    if unknown:
        raise SystemExit(f"--shapes: no benchmarks/models/<name>/config.json for {', '.join(unknown)}")
    names = args.variants.split(",")
    if names[0] != BASELINE or any(n.split("+")[0] not in variants() for n in names):
        raise SystemExit(f"--variants: LoRA first, then any of {', '.join(variants())}")

    import torch

    from ds_dynrank import dist
    from ds_dynrank.config import load_ds_config
    from ds_dynrank.ds_config import bf16_available, resolve

    dist.init()
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if not small and accel.device_name() == "cpu":
        raise SystemExit("gpu_check: no accelerator here; use --smoke for the CPU path")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve(
        load_ds_config(REPO / "ds_configs" / "zero2.json"),
        max_steps=args.warmup + args.steps,
        output_dir=out,
        bf16_supported=bf16_available(accel),
    )
    base.pop("tensorboard", None)
    base["train_micro_batch_size_per_gpu"] = args.micro_batch
    dtype = torch.bfloat16 if base["bf16"]["enabled"] else torch.float32
    rate = matmul_rate(accel.current_device_name(), dtype, 512 if small else 8192)
    device = {
        "name": accel.device_name(),
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": str(dtype),
        "matmul_flops": rate,
        "torch": torch.__version__,
    }
    print(f"[gpu_check] {device['card']}: {rate / 1e12:.1f} TFLOP/s ({device['dtype']} matmul)", flush=True)
    report = {"device": device, "settings": vars(args), "targets": TARGETS, "shapes": {}}
    for shape in shapes:
        started = time.perf_counter()
        shape_dir = REPO / "benchmarks" / "models" / shape
        vocab = json.loads((shape_dir / "config.json").read_text())["vocab_size"]
        batches = random_batches(vocab, args.micro_batch, args.seq_len, 4)
        validation = random_batches(vocab, 16, args.seq_len, 1, seed=1)[0]  # ALoRA's fixed scoring batch
        results = [run_variant(n, args, shape_dir, base, batches, validation) for n in names]
        ratios(results, rate, args.shipped_steps)
        report["shapes"][shape] = {"seconds": time.perf_counter() - started, "results": results}
        print_table(shape, results)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))  # after each shape: a cut run keeps some
    print(f"\n[gpu_check] written to {out / 'gpu_check.json'}", flush=True)
    dist.shutdown()  # before the interpreter's teardown, which can otherwise abort the finished process
    return 0


if __name__ == "__main__":
    sys.exit(main())
