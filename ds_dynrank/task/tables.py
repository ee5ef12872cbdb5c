"""Where a task's rows come from: the offline datasets by name, a local json/jsonl/csv/parquet file, a local dataset
directory (`save_to_disk` or loadable by `datasets`), or a hub name, all through `datasets`; and its held-out split.
"""

from __future__ import annotations

from pathlib import Path

from ds_dynrank.errors import UserInputError
from ds_dynrank.task import assets

EVAL_FRACTION = 0.25  # of a table without its own test split, held out at SPLIT_SEED
SPLIT_SEED = 0
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_table(name_or_path: str | None):
    """A datasets.DatasetDict from the default, a local file or directory, or a hub name."""
    import datasets

    try:
        if name_or_path in (None, "", "default", assets.DEFAULT_DATASET):
            return datasets.load_dataset("csv", data_files=str(assets.default_dataset_csv()))
        if name_or_path == assets.UNCERTAINTY_DATASET:  # the second offline benchmark task
            return datasets.load_dataset("csv", data_files=str(assets.uncertainty_dataset_csv()))
        if name_or_path in (assets.MATH_DATASET, assets.SHAREGPT_DATASET):  # the offline SFT sets
            built = assets.math_dataset_dir() if name_or_path == assets.MATH_DATASET else assets.sharegpt_dir()
            return datasets.load_dataset("json", data_files={s: str(built / f"{s}.jsonl") for s in ("train", "test")})
        path = Path(name_or_path).expanduser()
        if path.is_file():
            if path.suffix not in _BUILDERS:
                raise UserInputError(f"--dataset: {path} must end in one of {', '.join(_BUILDERS)}")
            return datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path))
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
            return datasets.load_dataset(str(path))
        if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix in _BUILDERS:
            raise UserInputError(f"--dataset: local path not found: {name_or_path}")
        return datasets.load_dataset(name_or_path)
    except UserInputError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserInputError(f"--dataset: could not load {name_or_path!r}: {first}") from None


def split_table(table, *, eval_fraction: float, split_seed: int):
    """(train, eval) splits: the table's own test/validation split if it has one, else a fixed-seed split."""
    train_name = "train" if "train" in table else next(iter(table))
    eval_name = next((n for n in ("test", "validation", "valid", "dev") if n in table and n != train_name), None)
    if eval_name is not None:
        return table[train_name], table[eval_name]
    parts = table[train_name].train_test_split(test_size=eval_fraction, seed=split_seed)
    return parts["train"], parts["test"]
