"""TRL's SFTTrainer with dynamic rank: the example the README shows, run as a user runs TRL.

    accelerate launch --config_file launch/accelerate/zero2.yaml launch/train_trl.py --max_steps 60
    accelerate launch --config_file launch/accelerate/zero3.yaml launch/train_trl.py --save_steps 20 --resume
    deepspeed --num_gpus 2 launch/train_trl.py --deepspeed ds_configs/hf_zero2_l1ra.json

The data is any of TRL's formats in a JSON-lines file (`messages`, `prompt`/`completion`, `text`); by default the
main job's school math (`messages`). The DeepSpeed config, with its "dynrank" section, comes from accelerate's
DeepSpeed plugin or from --deepspeed. At the end the adapters are saved as a stock PEFT adapter in --output_dir,
and each rank writes its final allocation and a SHA-256 of its adapters to `final_rank<N>.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub name or local directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--dataset", default=None, help="a JSON-lines file in a TRL format (default: school math)")
    p.add_argument("--deepspeed", default=None, help="the DeepSpeed config (default: accelerate's plugin)")
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--output_dir", default=str(REPO / "runs" / "trl"))
    p.add_argument("--save_steps", type=int, default=0, help="a Trainer checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output_dir")
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TRL's default: on (non-reentrant)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from datasets import load_dataset
    from trl import SFTConfig

    from ds_dynrank import DynRankSFTTrainer, UserInputError, dist
    from ds_dynrank.hf import final_state
    from ds_dynrank.rundir import write_json
    from ds_dynrank.task.assets import math_dataset_dir
    from ds_dynrank.task.job import trainer_arguments
    from ds_dynrank.task.models import resolve_model

    try:
        dist.init()  # before the model: ZeRO-3's partitioned build needs DeepSpeed's process group
        model, _ = resolve_model(args.model)
        data = Path(args.dataset) if args.dataset else math_dataset_dir() / "train.jsonl"
        if not data.is_file():
            raise UserInputError(f"--dataset: file not found: {data}")
        # a validation split carved from the training rows: methods that score on a fixed batch (ALoRA) take theirs
        # from it, and nothing is tuned on a test split
        splits = load_dataset("json", data_files=str(data), split="train").train_test_split(0.1, seed=args.seed)
        config = SFTConfig(
            max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing, **trainer_arguments(args)
        )
        trainer = DynRankSFTTrainer(
            model=model, args=config, train_dataset=splits["train"], eval_dataset=splits["test"]
        )
        trainer.train(resume_from_checkpoint=True if args.resume else None)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer.save_model()  # collective: a stock PEFT adapter (adapter_config.json, adapter_model.safetensors)
    write_json(Path(args.output_dir) / f"final_rank{dist.rank()}.json", final_state(trainer))  # collective
    dist.shutdown()  # before the interpreter's teardown, which can otherwise abort the finished process
    return 0


if __name__ == "__main__":
    sys.exit(main())
