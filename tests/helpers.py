"""Small real artefacts the tests build locally: a tiny Llama directory with its own tokenizer, a labelled CSV."""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import torch

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
