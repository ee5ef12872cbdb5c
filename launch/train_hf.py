"""The same fine-tuning driven by the HF Trainer instead of our explicit loop (example of the Trainer integration).

    deepspeed --num_gpus 2 launch/train_hf.py --deepspeed ds_configs/hf_zero2_l1ra.json --max_steps 60
    deepspeed --num_gpus 2 launch/train_hf.py ... --save_steps 20 --output_dir runs/hf          # Trainer checkpoints
    deepspeed --num_gpus 2 launch/train_hf.py ... --save_steps 20 --output_dir runs/hf --resume  # continue the last

Trainer builds the optimizer (with the method's param groups) and the LR schedule; DynRankTrainer's callback
runs the re-allocation engine at every optimizer step, and its checkpoints carry the allocator's state. At the end
the adapters are saved as a stock PEFT adapter in --output_dir, and each rank writes its final allocation and a
SHA-256 of its adapters to `<output_dir>/final_rank<N>.json`, so agreement across ranks can be checked from
outside.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    from ds_dynrank.errors import UserInputError
    from ds_dynrank.task import job

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "hf_zero2_l1ra.json"))
    job.add_data_args(p)  # the same data as the main job: --task, --dataset, --format, ...
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--output_dir", default=str(REPO / "runs" / "hf"))
    p.add_argument("--save_steps", type=int, default=0, help="a Trainer checkpoint every N steps (0: none)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="continue from the last checkpoint in --output_dir, or from the one given",
    )
    p.add_argument("--gradient_checkpointing", action="store_true", help="Trainer's, non-reentrant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    try:
        args = job.check_data_args(p.parse_args())
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch
    from transformers import TrainingArguments, set_seed

    from ds_dynrank import dist
    from ds_dynrank.config import from_ds_config, load_ds_config
    from ds_dynrank.hf import DynRankTrainer, final_state
    from ds_dynrank.rundir import write_json
    from ds_dynrank.task.models import load_model, load_tokenizer

    try:
        dist.init()  # before the model: ZeRO-3's partitioned build needs DeepSpeed's process group
        set_seed(args.seed)
        data = job.build_data(args, load_tokenizer(args.model))
        if args.packing:
            raise UserInputError("--packing: the main job packs (launch/train.py); this example trains unpacked")
        training = TrainingArguments(
            remove_unused_columns=False,
            **job.trainer_arguments(args),
            **checkpointing_args(args.gradient_checkpointing),
        )
        # after TrainingArguments: under a ZeRO-3 config transformers then builds the model partitioned
        dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32
        model = load_model(args.model, dtype=dtype)
        # ALoRA's scoring batch: held out of the training rows, as the main job does
        validation = job.hold_out_validation(data, from_ds_config(load_ds_config(args.deepspeed)), args.seed)
        trainer = DynRankTrainer(
            model=model,
            args=training,
            train_dataset=data.train,
            data_collator=data.collate,
            dynrank_validation=validation,
        )
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model()  # collective: a stock PEFT adapter (adapter_config.json, adapter_model.safetensors)
    write_json(Path(args.output_dir) / f"final_rank{dist.rank()}.json", final_state(trainer))  # collective
    dist.shutdown()  # before the interpreter's teardown, which can otherwise abort the finished process
    return 0


def checkpointing_args(on: bool) -> dict:
    """Trainer's own activation checkpointing, non-reentrant, under the name this transformers gives it (the
    `gradient_checkpointing` arguments are its deprecated aliases)."""
    from transformers import TrainingArguments

    from ds_dynrank.recompute import CHECKPOINT_KWARGS

    if not on:
        return {}
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": dict(CHECKPOINT_KWARGS)}


if __name__ == "__main__":
    sys.exit(main())
