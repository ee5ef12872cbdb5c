"""Small real artefacts the tests build locally: a tiny Llama directory with its own tokenizer, a labelled CSV."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from pathlib import Path

import torch

from ds_dynrank.launch_env import free_port  # noqa: F401 - the tests' rendezvous and SLURM daemon ports

REPO = Path(__file__).resolve().parent.parent
POSITIVE = ["great", "wonderful", "moving", "brilliant", "charming", "funny"]
NEGATIVE = ["dull", "awful", "boring", "terrible", "clumsy", "tedious"]
FILLER = ["the film", "this movie", "the plot", "the acting", "the ending", "the cast"]


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs whose sentiment word decides the label."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        out.append((f"{rng.choice(FILLER)} was {word} and {rng.choice(FILLER)} too .", label))
    return out


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def tiny_llama_config(vocab_size: int = 128, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, vocab_size: int = 128):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size)).float()


def build_tiny_model_dir(path: Path) -> Path:
    """A save_pretrained directory: byte-level BPE tokenizer trained here + randomly initialised tiny Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [t for t, _ in sentences(200)] + ["Text: Label: positive negative Review: Sentiment:"] * 20
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    ids = {s: fast.convert_tokens_to_ids(s) for s in specials}
    config = tiny_llama_config(len(fast), bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# SmolLM2's ChatML template without its default system prompt: the tiny chat model's, for the SFT tests
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MATH_ROWS = [
    ("What is 2 plus 3?", "5"),
    ("What is 7 times 6?", "42"),
    ("Is 9 more than 4?", "True"),
    ("What is 10 minus 8?", "2"),
    ("What is the gcd of 12 and 18?", "6"),
    ("Solve 2*x = 8 for x.", "4"),
]


def build_tiny_chat_model_dir(path: Path) -> Path:
    """A chat model directory like SmolLM2's, tiny: ChatML specials, a chat template, and pad = eos = <|im_end|>
    (masking labels by the pad id would then also mask every end of turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    texts = [t for t, _ in sentences(200)] + [f"{q} {a} system user assistant" for q, a in MATH_ROWS] * 20
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")  # fmt: skip
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    torch.manual_seed(0)
    ids = {s: fast.convert_tokens_to_ids(s) for s in specials}
    config = tiny_llama_config(len(fast), bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                               pad_token_id=ids["<|im_end|>"])  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def math_messages(n: int, system: str = "Give only the final answer.") -> list[dict]:
    """`n` conversations of the tiny math questions, in `messages` format."""
    rows = []
    for i in range(n):
        q, a = MATH_ROWS[i % len(MATH_ROWS)]
        rows.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]})  # fmt: skip
    return rows


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for launching the real entry points on this CPU machine."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


PYTHON = sys.executable


def offload_settings(stage: int) -> dict:
    """The shipped ds_configs/zero3_offload.json's offload blocks, the ones the offload tests run: the optimizer
    state on the host, and under ZeRO-3 the parameters too (DeepSpeed ignores offload_param below ZeRO-3)."""
    zero = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())["zero_optimization"]
    return {key: zero[key] for key in ("offload_optimizer", "offload_param")[: 2 if stage == 3 else 1]}


def offloaded(engine) -> bool:
    """Did DeepSpeed really take the offload path (it ignores offload settings where a stage has none), with every
    fp32 partition and Adam moment on the host?"""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0:
        return False  # no ZeRO optimizer: nothing to offload
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
    moments = [s[key] for s in opt.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    on_host = all(t.device.type == "cpu" for t in [*flats, *moments]) and len(moments) == 2 * len(flats)
    if engine.zero_optimization_stage() == 3:
        return bool(opt.offload_optimizer and opt.offload_param and on_host)
    return bool(opt.cpu_offload and on_host)


def tiny_ds_config(
    stage: int, *, accumulation: int = 2, scheduler_steps: int | None = None, offload: bool = False
) -> dict:
    """A DeepSpeed config for the tiny model under ZeRO `stage`: fp32, torch AdamW, adapters really sharded under
    ZeRO-3 (no persistence threshold), small buckets, optionally DeepSpeed's WarmupDecayLR and ZeRO-Offload."""
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": accumulation,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 10**6, "stage3_param_persistence_threshold": 0},
    }
    if offload:
        config["zero_optimization"].update(offload_settings(stage))
    if scheduler_steps:
        config["scheduler"] = {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": 1e-2,
                "warmup_num_steps": 2,
                "total_num_steps": scheduler_steps,
            },
        }
    return config


def assert_ranks_identical(directory: Path, prefix: str, stages) -> None:
    """Each rank saved {name: tensors} as `<prefix>_stage<s>_rank<r>.pt`; every tensor must match bit for bit."""
    for stage in stages:
        mine = torch.load(directory / f"{prefix}_stage{stage}_rank0.pt")
        other = torch.load(directory / f"{prefix}_stage{stage}_rank1.pt")
        assert mine.keys() == other.keys()
        for key in mine:
            for a, b in zip(mine[key], other[key]):
                assert torch.equal(a, b), f"ranks disagree on {key} under ZeRO-{stage}"


def load_agreeing_ranks(directory: Path, prefix: str) -> tuple[dict, dict]:
    """Each rank saved {run key: {"history", "state", ...}} as `<prefix>_rank<r>.pt`: both ranks must have taken the
    same allocation decisions and end with bit-identical adapters. Returns (rank 0's, rank 1's)."""
    mine, other = torch.load(directory / f"{prefix}_rank0.pt"), torch.load(directory / f"{prefix}_rank1.pt")
    assert mine.keys() == other.keys()
    for key, result in mine.items():
        assert result["history"] == other[key]["history"], f"{key}: ranks disagree on the allocation"
        for name, tensor in result["state"].items():
            assert torch.equal(tensor, other[key]["state"][name]), f"{key}: ranks disagree on {name}"
    return mine, other


def build_dynrank(
    stage: int,
    section: dict,
    *,
    scheduler_steps: int | None = 40,
    total_steps: int = 2000,
    offload: bool = False,
    **initialize_kwargs,
):
    """Tiny Llama + adapters + DeepSpeed engine under ZeRO `stage` + the controller, through the front door. The
    default run length leaves room for `"schedule": {"start": 1000}`, the tests that force their own events."""
    import ds_dynrank

    config = {**tiny_ds_config(stage, scheduler_steps=scheduler_steps, offload=offload), "dynrank": section}
    return ds_dynrank.initialize(tiny_llama(seed=0), config, total_steps=total_steps, **initialize_kwargs)


def train_steps(dynrank, steps: int, rank: int, seed: int, accumulation: int = 2) -> list[float]:
    """`steps` optimizer steps on random tokens (different on every rank); returns the micro-batch losses."""
    data, losses = torch.Generator().manual_seed(seed + rank), []
    for _ in range(steps * accumulation):
        ids = torch.randint(0, 128, (2, 12), generator=data)
        engine = dynrank.engine  # a physical event replaces the engine
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        dynrank.after_step()
        losses.append(loss.item())
    return losses


def engines_alive() -> int:
    """DeepSpeed engines the garbage collector tracks, unreachable ones not yet collected included: a rebuild
    that leaks or merely delays freeing the old engine counts 2."""
    import gc

    from deepspeed import DeepSpeedEngine

    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


def error_lines(text: str) -> list[str]:
    """The `error: ...` lines a refused start prints (the rest is library noise)."""
    return [line for line in text.splitlines() if line.startswith("error:")]


# the uninterrupted 2-process L1RA run that tests/e2e's resume and reshard tests share (fixture `l1ra_run`)
L1RA_STEPS = 12


def l1ra_config(directory: Path, name: str, *, dropout: float = 0.1, partitioned: bool = False) -> str:
    """`name` (zero2_l1ra.json: masked, zero3_l1ra.json: physical; the trainers' hf_zero{2,3}_l1ra.json) with
    events every 2 steps that move ranks. `dropout` on: exact continuation then needs each rank's RNG state back;
    `partitioned`: under ZeRO-3 the tiny model's weights really partitioned (no persistence threshold)."""
    cfg = json.loads((REPO / "ds_configs" / name).read_text())
    cfg["dynrank"]["l1ra"].update(l1_lambda=4.0, gate_lr=0.05)
    cfg["dynrank"]["schedule"].update(interval=2)
    cfg["dynrank"]["lora_dropout"] = dropout
    if partitioned:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / f"l1ra-{name}"
    path.write_text(json.dumps(cfg))
    return str(path)


def two_processes(port: int | None = None) -> list[str]:
    """The launcher of the 2-process runs that do not test the launcher: torchrun starts in about 3 s, the
    DeepSpeed launcher in about 10 (two Pythons that import DeepSpeed before the ranks start). The runs that are
    about the deepspeed launcher itself (test_launch, the README's commands, exit codes, preemption through it)
    call it by name."""
    return [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
    ]


def deepspeed_launcher(port: int | None = None) -> list[str]:
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(port or free_port())]


def l1ra_command(cfg: str, model: Path, data: Path, out: Path, launcher: list[str] | None = None) -> list[str]:
    """The 2-process job (torchrun unless `launcher` says otherwise): 12 steps, evaluated at 6 and 12, a
    checkpoint every 2."""
    return [
        *(two_processes() if launcher is None else launcher),
        str(REPO / "launch" / "train.py"),
        "--deepspeed",
        cfg,
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--task",
        "classification",
        "--max_steps",
        str(L1RA_STEPS),
        "--eval_interval",
        "6",
        "--eval_samples",
        "16",
        "--save_interval",
        "2",
        "--output_dir",
        str(out),
    ]


class SteppingEngine:
    """A stand-in engine with exactly what the controller reads between steps: global_steps moves at accumulation
    boundaries (also on skipped steps, as DeepSpeed's does)."""

    zero_optimization_stage = staticmethod(lambda: 0)
    global_samples, monitor, device = 0, None, "cpu"

    def __init__(self, module) -> None:
        self.global_steps, self.skipped_steps, self.applied, self.optimizer, self.module = 0, 0, True, None, module

    def was_step_applied(self) -> bool:
        return self.applied
