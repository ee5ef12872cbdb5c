"""The outside peer: PEFT's own AdaLoRA (`AdaLoraConfig`) on the same task, data, steps and evaluation as
launch/train.py, driven the way PEFT requires.

    deepspeed --num_gpus 2 launch/train_peft_adalora.py --deepspeed ds_configs/zero0_peft_adalora.json

`update_and_allocate(global_step)` runs at every optimizer step, after the gradients are reduced and before the
step. It runs under ZeRO-0, the one stage where PEFT's masking holds: ZeRO-0 in fp32 keeps no separate master
weights, and its gradients are all-reduced in `engine.backward`, so every rank masks alike. Under ZeRO 1-3,
`masked_fill_` edits only the working copy, and the optimizer's fp32 master restores the pruned values
(`../shared/docs/methods.md` §4.1). The run writes the same `metrics.json` as launch/train.py, plus `allocation.json`
(the rank per module PEFT's final mask keeps).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from train import parse_args  # noqa: E402 - the same flags as the main job

from ds_dynrank.errors import UserInputError  # noqa: E402


def peft_config_from(section: dict, total_steps: int):
    """AdaLoraConfig from the `"peft_adalora"` section (PEFT's own field names). Defaults follow our AdaLoRA-style
    config: init_r 12 -> target_r 8, tinit 10%, tfinal 20%, deltaT 1% of the run."""
    from peft import AdaLoraConfig

    fields = {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "beta1": 0.85, "beta2": 0.85,
              "orth_reg_weight": 0.5, "tinit": round(0.1 * total_steps), "tfinal": round(0.2 * total_steps),
              "deltaT": max(1, round(0.01 * total_steps)),
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]}  # fmt: skip
    unknown = set(section) - set(fields)
    if unknown:
        raise UserInputError(f"peft_adalora: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(fields))})")
    fields.update({k: v for k, v in section.items() if v is not None})  # null: keep the default
    try:
        return AdaLoraConfig(task_type="CAUSAL_LM", total_step=total_steps, **fields)
    except (ValueError, TypeError) as err:
        raise UserInputError(f"peft_adalora: {err}") from None


def train(args) -> dict:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from peft import get_peft_model
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm
    from transformers import set_seed

    from ds_dynrank import dist, monitor, outputs
    from ds_dynrank.config import load_ds_config
    from ds_dynrank.data import build_task, collate_train
    from ds_dynrank.ds_config import resolve
    from ds_dynrank.evaluation import evaluate
    from ds_dynrank.models import load_model_and_tokenizer
    from ds_dynrank.runtime import bf16_available, local_world_size, share_cpu_threads

    raw = load_ds_config(args.deepspeed)
    stage = (raw.get("zero_optimization") or {}).get("stage", 0)
    if stage != 0:
        raise UserInputError(f"zero_optimization.stage: PEFT's AdaLoRA masks only hold under ZeRO-0, got {stage}")
    peft_cfg = peft_config_from(raw.pop("peft_adalora", {}), args.max_steps)
    raw.pop("dynrank", None)
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    task = build_task(tokenizer, args.dataset, text_column=args.text_column, label_column=args.label_column,
                      template=args.prompt_template, max_length=args.max_length,
                      max_eval_samples=args.eval_samples or None)  # fmt: skip
    model = get_peft_model(model, peft_cfg)
    dist.init(timeout_s=args.dist_timeout)
    stamp = dist.broadcast(torch.tensor([int(time.strftime("%Y%m%d%H%M%S"))]), src=0).item()
    output_dir = Path(args.output_dir or REPO / "runs" / f"peft_adalora_{stamp}")
    accel = get_accelerator()
    share_cpu_threads(accel.device_name(), local_world_size(dist.world_size()))
    ds_config = resolve(raw, max_steps=args.max_steps, output_dir=output_dir, bf16_supported=bf16_available(accel))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    sampler = DistributedSampler(task.train, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                                 seed=args.seed, drop_last=True)  # fmt: skip
    loader = DataLoader(task.train, batch_size=engine.train_micro_batch_size_per_gpu(), sampler=sampler,
                        collate_fn=lambda b: collate_train(b, task.candidate_ids, task.pad_id),
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip

    def run_eval() -> dict:
        engine.eval()
        result = evaluate(engine, task, batch_size=args.eval_batch_size, device=engine.device)
        engine.train()
        monitor.write(engine.monitor, monitor.scalar_events("Eval", result, engine.global_samples))
        return result

    baseline = run_eval()
    history = [{"step": 0, **baseline}]
    start, epoch = time.time(), 0
    bar = tqdm(total=args.max_steps, disable=not dist.is_main(), desc="train (PEFT AdaLoRA)", dynamic_ncols=True)
    while engine.global_steps < args.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss  # includes PEFT's orth. reg.
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():  # reduced grads, before the step: PEFT's placement
                model.base_model.update_and_allocate(engine.global_steps + 1)
            engine.step()
            if engine.is_gradient_accumulation_boundary() or engine.global_steps >= args.max_steps:
                bar.update(engine.global_steps - bar.n)
            step = engine.global_steps
            if args.eval_interval and step % args.eval_interval == 0 and 0 < step < args.max_steps and bar.n == step:
                history.append({"step": step, **run_eval()})
            if step >= args.max_steps:
                break
        epoch += 1
    bar.close()
    final = run_eval()
    history.append({"step": engine.global_steps, **final})
    pattern = peft_cfg.rank_pattern or {}
    ranks = {module_name(name): int(sum(mask)) for name, mask in pattern.items()}
    metrics = {
        "metric": "accuracy", "value": final["accuracy"], "baseline_value": baseline["accuracy"],
        "eval_loss": final["eval_loss"], "eval_examples": len(task.eval), "steps": engine.global_steps,
        "samples": engine.global_samples, "wall_seconds": round(time.time() - start, 2),
        "trainable_parameters": sum(p.numel() for p in trainable), "world_size": dist.world_size(),
        "zero_stage": 0, "method": "peft-adalora", "final_budget": sum(ranks.values()), "budget_unit": "rank",
        "eval_history": history,
    }  # fmt: skip
    if dist.is_main():
        outputs.write_json(output_dir / "metrics.json", metrics)
        outputs.write_json(output_dir / "allocation.json", ranks)
        print(f"accuracy {final['accuracy']:.4f} (untrained {baseline['accuracy']:.4f}) after "
              f"{engine.global_steps} steps; final rank budget {sum(ranks.values())}; "
              f"outputs in {output_dir}")  # fmt: skip
    dist.barrier()
    return metrics


def module_name(pattern_key: str) -> str:
    """PEFT's rank_pattern key ("base_model.model.<module>.lora_E.<adapter>") as the module name our runs use."""
    name = pattern_key.removeprefix("base_model.model.")
    return name[: name.index(".lora_E")] if ".lora_E" in name else name


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
