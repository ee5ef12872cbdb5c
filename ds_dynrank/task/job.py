"""What the shipped entry points share around the library: their flags, the task's data and evaluation, the run
directory every rank agrees on, the data order, the loss guard, and the exit codes.

launch/train.py (our method) and launch/train_peft_adalora.py (PEFT's AdaLoRA, the outside peer) both build on it,
so the two run the same job.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from ds_dynrank.errors import NonFiniteLossError, UserInputError
from ds_dynrank.launch_env import launch_rank

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
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


def build_data(args: argparse.Namespace, tokenizer):
    """The task's tokenised splits, every problem with the dataset a UserInputError before training."""
    from ds_dynrank.task.data import build_task

    return build_task(
        tokenizer,
        args.dataset,
        text_column=args.text_column,
        label_column=args.label_column,
        template=args.prompt_template,
        max_length=args.max_length,
        max_eval_samples=args.eval_samples or None,
    )


def hold_out_validation(task, cfg, seed: int) -> dict | None:
    """The method's fixed scoring batch (ALoRA's): its `validation_samples` training examples drawn with the run's
    seed (the same on every rank) and removed from training, so the allocation never looks at the evaluation split.
    None for methods that score on none."""
    n = cfg.validation_samples
    if not n:
        return None
    import torch

    from ds_dynrank.task.data import collate_train

    if n >= len(task.train):
        raise UserInputError(
            f"dynrank.{cfg.spec.validation_field}: {n} leaves no training data ({len(task.train)} examples)"
        )
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:n])
    batch = collate_train([task.train[i] for i in order[:n]], task.candidate_ids, task.pad_id)
    task.train = [e for i, e in enumerate(task.train) if i not in chosen]
    return batch


def shared_output_dir(args: argparse.Namespace, prefix: str = "") -> Path:
    """One directory for all ranks: rank 0's timestamp is broadcast (collective)."""
    import torch

    from ds_dynrank import dist

    stamp = torch.tensor([int(datetime.now().strftime("%Y%m%d%H%M%S"))], dtype=torch.int64)
    stamp = dist.broadcast(stamp, src=0)
    return Path(args.output_dir or REPO / "runs" / f"{prefix}{stamp.item()}")


def train_loader(task, args: argparse.Namespace, micro_batch: int):
    """(sampler, loader): this rank's share of the shuffled training split, the same order for a given seed."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ds_dynrank import dist
    from ds_dynrank.task.data import collate_train

    sampler = DistributedSampler(
        task.train, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        task.train,
        batch_size=micro_batch,
        sampler=sampler,
        collate_fn=lambda b: collate_train(b, task.candidate_ids, task.pad_id),
        generator=torch.Generator().manual_seed(args.seed),  # iter() draws from it, not from dropout's global RNG
    )
    return sampler, loader


def steps_per_epoch(n_train: int, micro_batch: int, accumulation: int, world: int) -> int:
    """Optimizer steps in one pass over the training split (DistributedSampler drops the remainder)."""
    per_rank = n_train // world
    return max(1, -(-per_rank // micro_batch) // accumulation)


def evaluator(task, args: argparse.Namespace) -> Callable:
    """`run_eval(engine)`: held-out accuracy and loss, summed over ranks (collective), written to TensorBoard."""
    from ds_dynrank import monitor
    from ds_dynrank.task.evaluation import evaluate

    def run_eval(engine) -> dict[str, float]:
        engine.eval()
        result = evaluate(engine, task, batch_size=args.eval_batch_size, device=engine.device)
        engine.train()
        monitor.write(engine.monitor, monitor.scalar_events("Eval", result, engine.global_samples))
        return result

    return run_eval


def stop_on_non_finite(loss, engine, checkpoints: Path) -> None:
    """A NaN or Inf loss on any rank stops every rank before the step is applied, so the adapters are not poisoned
    and the last checkpoint stays the last good state (collective)."""
    import torch

    from ds_dynrank import checkpoint, dist

    bad = dist.ranks_where(not bool(torch.isfinite(loss.detach()).all()), device=engine.device)
    if bad:
        tag = checkpoint.latest_tag(checkpoints)
        last = f"{checkpoints}/{tag}" if tag else "none written"
        raise NonFiniteLossError(
            f"loss is not finite (NaN or Inf) on rank(s) {bad} at optimizer step "
            f"{engine.global_steps + 1}; stopped before applying it. Last good checkpoint: {last}"
        )


def run_main(train: Callable[[argparse.Namespace], object], argv: list[str] | None, description: str) -> int:
    """Run a job and map how it ends to an exit code: 0 done, 2 bad input (one line, nothing trained), 3 a
    non-finite loss, 4 a dead or hung peer. Rank 0 alone prints the errors every rank shares."""
    try:
        train(parse_args(argv, description))
    except UserInputError as err:
        if launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as err:
        if launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except RuntimeError as err:
        from ds_dynrank.dist import is_collective_failure

        if not is_collective_failure(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(
            f"error: rank {launch_rank()}: a collective failed: a peer process died or stopped responding "
            f"(within --dist_timeout). Checkpoints already committed are intact; resume with --resume. "
            f"[{first}]",
            file=sys.stderr,
            flush=True,
        )
        return 4
    return 0
