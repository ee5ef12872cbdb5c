"""What the shipped entry points share around the library: their flags, the task's data and evaluation, the run
directory every rank agrees on, the data order, the loss guard, and the exit codes.

launch/train.py (our method) and launch/train_peft_adalora.py (PEFT's AdaLoRA, the outside peer) both build on it,
so the two run the same job.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ds_dynrank.errors import (
    EXIT_PREEMPTED,
    CheckpointWriteError,
    NonFiniteLossError,
    Preempted,
    UserInputError,
)
from ds_dynrank.launch_env import launch_rank

REPO = Path(__file__).resolve().parents[2]


TASKS = ("sft", "classification")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The flags that say what to train on, shared by every entry point (the main job, HF Trainer, the peer)."""
    from ds_dynrank.task.sft import FORMATS

    p.add_argument("--model", default=None, help="HF hub name, local directory or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--task", choices=TASKS, default="sft", help="supervised fine-tuning, or label classification")
    p.add_argument(
        "--dataset",
        default=None,
        help="hub name, local json/jsonl/csv/parquet file or directory, or an offline set: school-math "
        "(the SFT default), sharegpt; mr-polarity (the classification default), wiki-uncertainty",
    )
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="SFT rows (auto: from the columns)")
    p.add_argument("--chat_template", default=None, help="a Jinja chat template file, for a tokenizer without one")
    p.add_argument(
        "--truncation",
        default="cut",
        choices=("cut", "drop"),
        help="an SFT example over --max_length: cut its beginning, keeping its answer, or drop it",
    )
    p.add_argument("--packing", action="store_true", help="SFT: pack examples into rows of --max_length")
    p.add_argument(
        "--eval_generate",
        type=int,
        default=None,
        help="SFT: held-out questions whose greedy answer is scored by exact match (default: 64 for "
        "school-math, 0 otherwise)",
    )
    p.add_argument("--max_new_tokens", type=int, default=16, help="SFT: the longest answer exact match decodes")
    p.add_argument("--text_column", default="text", help="classification: the input text")
    p.add_argument("--label_column", default="label", help="classification: the label")
    p.add_argument("--prompt_template", default=None, help="classification: prompt with {text}; the label answers")
    p.add_argument(
        "--bad_rows",
        choices=("refuse", "drop"),
        default="refuse",
        help="classification: a row with an empty text or label stops the run naming it, or is dropped and counted",
    )
    p.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="tokens per example (SFT: per packed row), prompt and answer together (default: SFT 256, "
        "classification 96)",
    )
    p.add_argument(
        "--eval_samples",
        type=int,
        default=None,
        help="held-out examples to evaluate (0: all; default: SFT 160, classification 300)",
    )
    p.add_argument("--eval_batch_size", type=int, default=None, help="per process (default: SFT 16, classification 8)")


def check_data_args(args: argparse.Namespace) -> argparse.Namespace:
    """Task-dependent defaults, and the data flags' bounds: a UserInputError each."""
    sft = args.task == "sft"  # SFT evaluates costlier examples (a whole answer each): fewer, by default
    defaults = {"max_length": (256, 96), "eval_samples": (160, 300), "eval_batch_size": (16, 8)}
    for name, (for_sft, for_classification) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, for_sft if sft else for_classification)
    if getattr(args, "eval_interval", 0) is None:
        args.eval_interval = 0 if sft else 30
    if args.packing and args.task != "sft":
        raise UserInputError("--packing: packs SFT examples; --task classification batches are not packed")
    for name in ("eval_batch_size", "max_length", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    for name in ("eval_samples", "eval_generate"):
        if (getattr(args, name) or 0) < 0:
            raise UserInputError(f"--{name}: must be >= 0, got {getattr(args, name)}")
    return args


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"), help="DeepSpeed JSON config path")
    add_data_args(p)
    p.add_argument("--max_steps", type=int, default=60, help="optimizer steps (gradient-accumulation boundaries)")
    p.add_argument(
        "--eval_interval",
        type=int,
        default=None,
        help="evaluate every N optimizer steps besides the start and the end (0: never; default: SFT 0, "
        "classification 30)",
    )
    p.add_argument("--output_dir", default=None, help="default: runs/<timestamp>")
    p.add_argument("--save_interval", type=int, default=0, help="checkpoint every N optimizer steps (0: only at end)")
    p.add_argument(
        "--save_total_limit",
        type=int,
        default=0,
        help="keep the newest N checkpoints, deleting older ones once a newer one is committed (0: keep all)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint: 'latest' in --output_dir (the default), a checkpoint root or tag; "
        "'auto': the latest in --output_dir if there is one, else start (what a requeued job wants)",
    )
    p.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in backward (non-reentrant): less memory, more compute",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist_timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = check_data_args(p.parse_args(argv))
    if args.max_steps < 1:
        raise UserInputError(f"--max_steps: must be >= 1, got {args.max_steps}")
    if args.resume in ("latest", "auto") and not args.output_dir:
        raise UserInputError(f"--resume {args.resume}: resuming the latest checkpoint needs the run's --output_dir")
    for name in ("eval_interval", "save_interval", "save_total_limit"):
        if getattr(args, name) < 0:
            raise UserInputError(f"--{name}: must be >= 0, got {getattr(args, name)}")
    return args


def check_gradient_checkpointing(model, args: argparse.Namespace) -> None:
    """--gradient_checkpointing for a model without support is refused before any process group exists (on the
    model's meta-device skeleton)."""
    if args.gradient_checkpointing:
        from ds_dynrank.recompute import check_supported

        check_supported(model, "--gradient_checkpointing")


def apply_gradient_checkpointing(model, args: argparse.Namespace) -> None:
    """--gradient_checkpointing, on the loaded model before the adapters go in."""
    if args.gradient_checkpointing:
        from ds_dynrank.recompute import enable_activation_checkpointing

        enable_activation_checkpointing(model)


@dataclass
class JobData:
    """A task made ready for the loop: its training examples, how a list of them becomes a batch, how the engine
    is evaluated (collective), which metric heads the results, and (SFT with --packing) how examples become rows."""

    task: str
    train: list
    collate: Callable[[list], dict]
    evaluate: Callable[[object], dict[str, float]]
    headline: str
    eval_examples: int
    pack: Callable[[list], tuple[list, Callable[[list], dict]]] | None = None
    answers: list[dict] = field(default_factory=list)  # SFT exact match: the latest evaluation's greedy answers

    def training_items(self) -> tuple[list, Callable[[list], dict]]:
        """What the loader draws from and how it collates: packed rows, or the examples themselves."""
        return self.pack(self.train) if self.pack is not None else (self.train, self.collate)


def build_data(args: argparse.Namespace, tokenizer) -> JobData:
    """The task's tokenised splits, every problem with the dataset a UserInputError before training."""
    return _build_sft(args, tokenizer) if args.task == "sft" else _build_classification(args, tokenizer)


def _build_classification(args: argparse.Namespace, tokenizer) -> JobData:
    from ds_dynrank.task.classification import build_task, collate_train
    from ds_dynrank.task.evaluation import evaluate

    task = build_task(
        tokenizer,
        args.dataset,
        text_column=args.text_column,
        label_column=args.label_column,
        template=args.prompt_template,
        max_length=args.max_length,
        max_eval_samples=args.eval_samples or None,
        bad_rows=args.bad_rows,
    )
    if task.dropped and launch_rank() == 0:
        print(f"[data] dropped {task.dropped} row(s) with an empty text or label (--bad_rows drop)", flush=True)

    def run(engine) -> dict[str, float]:
        return evaluate(engine, task, batch_size=args.eval_batch_size, device=engine.device)

    collate = functools.partial(collate_train, candidate_ids=task.candidate_ids, pad_id=task.pad_id)
    return JobData("classification", task.train, collate, run, "accuracy", len(task.eval))


def _build_sft(args: argparse.Namespace, tokenizer) -> JobData:
    from ds_dynrank.task.sft import collate, collate_packed, pack
    from ds_dynrank.task.sft_eval import evaluate_loss, exact_match, greedy_answers
    from ds_dynrank.task.sft_task import build_sft

    data = build_sft(
        tokenizer,
        args.dataset,
        fmt=args.format,
        max_length=args.max_length,
        truncation=args.truncation,
        eval_samples=args.eval_samples or None,
        generate=args.eval_generate,
        chat_template=args.chat_template,
    )

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    answers: list[dict] = []  # filled by each evaluation, read by write_results

    def run(engine) -> dict[str, float]:
        result = evaluate_loss(
            engine, data.eval, batch_size=args.eval_batch_size, pad_id=data.pad_id, device=engine.device
        )
        if data.generate:
            answers[:] = greedy_answers(
                engine.module,
                data.generate,
                decode,
                batch_size=args.eval_batch_size,
                pad_id=data.pad_id,
                eos_id=data.eos_id,
                max_new_tokens=args.max_new_tokens,
                device=engine.device,
                synced=engine.zero_optimization_stage() == 3,
            )
            result["exact_match"] = exact_match(answers)
        return result

    def packed(examples: list) -> tuple[list, Callable[[list], dict]]:
        return pack(examples, args.max_length), functools.partial(collate_packed, pad_id=data.pad_id)

    headline = "exact_match" if data.generate else "eval_loss"
    collate_examples = functools.partial(collate, pad_id=data.pad_id)
    pack_rows = packed if args.packing else None
    return JobData("sft", data.train, collate_examples, run, headline, len(data.eval), pack_rows, answers)


def trainer_arguments(args: argparse.Namespace) -> dict:
    """The TrainingArguments / SFTConfig settings the trainer examples (train_hf.py, train_trl.py) share: their
    flags, a linear schedule with 10% warm-up, TensorBoard, and the CPU said where DeepSpeed's accelerator is one."""
    from deepspeed.accelerator import get_accelerator

    return dict(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=5,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=["tensorboard"],
        seed=args.seed,
        use_cpu=get_accelerator().device_name() == "cpu",
    )


def train_peer(engine, data: JobData, args: argparse.Namespace, *, desc: str, before_step=None):
    """The outside peers' loop (launch/train_peft_*.py): the main job's data, evaluation and eval schedule around a
    plain DeepSpeed loop. `before_step(step)` runs at each accumulation boundary between backward (the gradients
    reduced) and the step, PEFT AdaLoRA's placement of update_and_allocate. Returns (baseline, final, eval
    history, training seconds)."""
    import time

    from tqdm import tqdm

    from ds_dynrank import dist

    items, collate = data.training_items()
    sampler, loader = train_loader(items, collate, args, engine.train_micro_batch_size_per_gpu())
    run_eval = evaluator(data)
    baseline = run_eval(engine)
    history = [{"step": 0, **baseline}]
    start, epoch = time.time(), 0
    bar = tqdm(total=args.max_steps, disable=not dist.is_main(), desc=desc, dynamic_ncols=True)
    while engine.global_steps < args.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch_tokens(batch)  # (packed rows carry their count; the model takes no such input)
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            if before_step is not None and engine.is_gradient_accumulation_boundary():
                before_step(engine.global_steps + 1)
            engine.step()
            if engine.is_gradient_accumulation_boundary() or engine.global_steps >= args.max_steps:
                bar.update(engine.global_steps - bar.n)
            step = engine.global_steps
            if args.eval_interval and step % args.eval_interval == 0 and 0 < step < args.max_steps and bar.n == step:
                history.append({"step": step, **run_eval(engine)})
            if step >= args.max_steps:
                break
        epoch += 1
    bar.close()
    seconds = time.time() - start
    final = run_eval(engine)
    history.append({"step": engine.global_steps, **final})
    return baseline, final, history, seconds


def write_results(run, job: JobData, metrics: dict) -> None:
    """metrics.json and, for SFT with exact match, predictions.jsonl (the final evaluation's answers). Rank 0."""
    run.write_metrics(metrics)
    if job.answers:
        run.write_predictions(job.answers)


def peer_metrics(data: JobData, engine, baseline: dict, final: dict, history: list, seconds: float, **extra) -> dict:
    """The peers' metrics.json: the main job's fields, then the peer's own (`extra`)."""
    from ds_dynrank import dist

    return {
        "task": data.task,
        "metric": data.headline,
        "value": final[data.headline],
        "baseline_value": baseline[data.headline],
        **final,
        "baseline": baseline,
        "eval_examples": data.eval_examples,
        "steps": engine.global_steps,
        "samples": engine.global_samples,
        "wall_seconds": round(seconds, 2),
        "world_size": dist.world_size(),
        **extra,
        "eval_history": history,
    }


def hold_out_validation(job: JobData, cfg, seed: int) -> dict | None:
    """The method's fixed scoring batch (ALoRA's): its `validation_samples` training examples drawn with the run's
    seed (the same on every rank) and removed from training, so the allocation never looks at the evaluation split.
    None for methods that score on none."""
    n = cfg.validation_samples
    if not n:
        return None
    import torch

    if n >= len(job.train):
        raise UserInputError(
            f"dynrank.{cfg.spec.validation_field}: {n} leaves no training data ({len(job.train)} examples)"
        )
    order = torch.randperm(len(job.train), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:n])
    batch = job.collate([job.train[i] for i in order[:n]])
    job.train = [e for i, e in enumerate(job.train) if i not in chosen]
    return batch


def shared_output_dir(args: argparse.Namespace, prefix: str = "") -> Path:
    """One directory for all ranks: rank 0's timestamp is broadcast (collective)."""
    import torch

    from ds_dynrank import dist

    stamp = torch.tensor([int(datetime.now().strftime("%Y%m%d%H%M%S"))], dtype=torch.int64)
    stamp = dist.broadcast(stamp, src=0)
    return Path(args.output_dir or REPO / "runs" / f"{prefix}{stamp.item()}")


def train_loader(items: list, collate: Callable[[list], dict], args: argparse.Namespace, micro_batch: int):
    """(sampler, loader): this rank's share of the shuffled training items, the same order for a given seed."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ds_dynrank import dist

    sampler = DistributedSampler(
        items, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        items,
        batch_size=micro_batch,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),  # iter() draws from it, not from dropout's global RNG
    )
    return sampler, loader


def steps_per_epoch(n_train: int, micro_batch: int, accumulation: int, world: int) -> int:
    """Optimizer steps in one pass over the training split (DistributedSampler drops the remainder)."""
    per_rank = n_train // world
    return max(1, -(-per_rank // micro_batch) // accumulation)


EVAL_TAGS = {"eval_loss": "loss"}  # SFT's held-out loss is Eval/loss; every other metric keeps its name


def evaluator(job: JobData) -> Callable:
    """`run_eval(engine)`: the task's held-out metrics, over every rank (collective), written to TensorBoard."""
    from ds_dynrank import monitor

    def run_eval(engine) -> dict[str, float]:
        engine.eval()
        result = job.evaluate(engine)
        engine.train()
        tags = EVAL_TAGS if job.task == "sft" else {}
        named = {tags.get(k, k): v for k, v in result.items()}
        monitor.write(engine.monitor, monitor.scalar_events("Eval", named, engine.global_samples))
        return result

    return run_eval


def summary(job: JobData, baseline: dict, final: dict) -> str:
    """The job's last line: what training changed, before -> after."""
    if job.task == "classification":
        return f"accuracy {final['accuracy']:.4f} (untrained {baseline['accuracy']:.4f})"
    names = {
        "eval_loss": "eval loss",
        "perplexity": "perplexity",
        "token_accuracy": "token accuracy",
        "exact_match": "exact match",
    }
    return ", ".join(f"{label} {baseline[k]:.4g} -> {final[k]:.4g}" for k, label in names.items() if k in final)


def batch_tokens(batch: dict) -> int:
    """The real (unpadded) tokens of a micro-batch, taken out of packed batches, which count them themselves."""
    if "num_tokens" in batch:
        return int(batch.pop("num_tokens"))
    return int(batch["attention_mask"].sum())


def log_allocation(dynrank) -> None:
    """After an event: the report's rank heatmap as a TensorBoard image (rank 0, TensorBoard on)."""
    from ds_dynrank import monitor

    if monitor.summary_writer(dynrank.engine.monitor) is None:
        return
    from ds_dynrank.tools.report import heatmap_image

    monitor.write_image(
        dynrank.engine.monitor, "DynRank/rank_heatmap", heatmap_image(dynrank.history), dynrank.engine.global_samples
    )


def check_packing_isolation(engine, job: JobData, atol: float = 1e-3) -> None:
    """Refuse --packing for a model whose attention lets packed examples see each other: two training examples
    packed into one row must give the logits each gives alone (collective: every rank runs the same forwards)."""
    import torch

    from ds_dynrank.task.sft import collate, collate_packed

    first, second = sorted(job.train[:8], key=len)[:2]
    with torch.no_grad():
        was_training = engine.module.training
        engine.module.eval()
        try:
            alone = [
                engine(**{k: v.to(engine.device) for k, v in collate([e], 0).items() if k != "labels"}).logits
                for e in (first, second)
            ]
            row = collate_packed([[first, second]], 0)
            row.pop("num_tokens"), row.pop("labels")
            packed = engine(**{k: v.to(engine.device) for k, v in row.items()}).logits
        finally:
            engine.module.train(was_training)
    n = len(first)
    gap = max(
        (packed[0, :n] - alone[0][0]).abs().max().item(),
        (packed[0, n : n + len(second)] - alone[1][0]).abs().max().item(),
    )
    scale = max(1.0, alone[1].abs().max().item())
    if gap > atol * scale * (1 if alone[1].dtype == torch.float32 else 50):
        raise UserInputError(
            f"--packing: this model's attention does not keep packed examples apart (logits move by {gap:.3g} when "
            "a second example shares the row); train without --packing"
        )


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
    non-finite loss, 4 a dead or hung peer, 5 a checkpoint that could not be written, 75 stopped by a signal with
    its progress saved (EXIT_PREEMPTED). Rank 0 alone prints the errors every rank shares."""
    try:
        train(parse_args(argv, description))
    except UserInputError as err:
        if launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:
        if launch_rank() == 0:
            print(f"stopped: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        if err.local or launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 5
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
    from ds_dynrank import dist

    dist.shutdown()  # a finished job leaves the process group before the interpreter's teardown (see there)
    return 0
