"""School math with exact answers, from DeepMind's `mathematics-dataset` generator, byte-identical for a seed.

    PYTHONHASHSEED=0 python -m ds_dynrank.task.mathgen OUT_DIR --seed 0 --train 1000 --test 100

Writes `train.jsonl` (the generator's train samplers over their whole entropy range, as its own `generate` does
without a difficulty split) and `test.jsonl` (its held-out interpolation samplers, the same range: the package
splits values by hash, so no test question appears in train), one conversation per line in TRL's `messages`
format, plus the module each row came from.

The package (1.0.1, 2019) does not run on today's numpy and sympy and is not deterministic as shipped; without
editing the installed files, this module: rewrites four lines of `sample/polynomials.py` as it is imported (sympy's
moved `base_solution_linear`, numpy's removed `np.object` and `ndarray.itemset`); seeds all three random sources it
draws from (Python's `random`, numpy's global RNG, sympy's own); and replaces `composition.expand_entities`, which
orders a set of objects hashed by `id()`, with an insertion-ordered one. Set iteration order of variable names
still depends on PYTHONHASHSEED: run it as a subprocess with a fixed one (assets.py does).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

SYSTEM = "Give only the final answer."
MODULES = (
    "arithmetic__add_or_sub",
    "arithmetic__mul",
    "numbers__gcd",
    "numbers__place_value",
    "comparison__pair",
    "algebra__linear_1d",
)
_FIXES = {
    "mathematics_dataset.sample.polynomials": (
        (
            "from sympy.solvers.diophantine import base_solution_linear",
            "from sympy.solvers.diophantine.diophantine import base_solution_linear",
        ),
        ("dtype=np.object", "dtype=object"),
        ("coeffs.itemset(index, value)", "coeffs[index] = value"),
        ("expanded_coefficients.itemset(power, coeffs)", "expanded_coefficients[power] = coeffs"),
    )
}


class _SourceFixer(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Loads the few modules in `_FIXES` from their installed source with those lines rewritten."""

    def find_spec(self, name, path, target=None):
        if name not in _FIXES:
            return None
        sys.meta_path.remove(self)
        try:
            origin = importlib.util.find_spec(name).origin
        finally:
            sys.meta_path.insert(0, self)
        return importlib.util.spec_from_file_location(name, origin, loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        source = Path(module.__file__).read_text()
        for old, new in _FIXES[module.__name__]:
            if old not in source:
                raise RuntimeError(f"mathematics_dataset: expected {old!r} in {module.__file__} (another version?)")
            source = source.replace(old, new)
        exec(compile(source, module.__file__, "exec"), module.__dict__)


def _load_generator():
    """The package's module registry, importable and deterministic."""
    if not any(isinstance(f, _SourceFixer) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFixer())
    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import modules
    from mathematics_dataset.util import composition

    def expand_entities(context, **kwargs):
        """The package's own, with the entities in first-seen order instead of a set hashed by id()."""
        kwargs = kwargs.copy()
        entities = list(dict.fromkeys(context.child_entities))
        for key, maybe_entity in kwargs.items():
            if isinstance(maybe_entity, composition.Entity):
                if maybe_entity not in entities:
                    entities.append(maybe_entity)
                kwargs[key] = maybe_entity.handle
        random.shuffle(entities)
        descriptions = []
        for entity in entities:
            descriptions.append(entity.child_description)
            if not entity.expression_used:
                descriptions.append(entity.description)
        return " ".join(s for s in descriptions if s), kwargs

    composition.expand_entities = expand_entities
    return modules, generate_settings


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}__{key}" if prefix else key
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def _whole_range(range_: tuple[float, float]) -> tuple[float, float]:
    return range_


def generate(seed: int, n_train: int, n_test: int, modules_: tuple[str, ...] = MODULES) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}: `n_train` and `n_test` questions per module, in module order."""
    import numpy as np
    from sympy.core import random as sympy_random

    modules, settings = _load_generator()
    random.seed(seed)
    np.random.seed(seed)
    sympy_random.seed(seed)
    samplers = {"train": _flatten(modules.train(_whole_range)), "test": _flatten(modules.test())}
    unknown = [m for m in modules_ if m not in samplers["train"]]
    if unknown:
        raise ValueError(f"unknown mathematics_dataset modules {unknown} (known: {sorted(samplers['train'])})")

    def sample(module) -> tuple[str, str]:
        while True:  # the package's own rule: questions and answers past its length limits are drawn again
            problem = module()
            question, answer = str(problem.question), str(problem.answer)
            if len(question) <= settings.MAX_QUESTION_LENGTH and len(answer) <= settings.MAX_ANSWER_LENGTH:
                return question, answer

    out: dict[str, list[dict]] = {"train": [], "test": []}
    for name in modules_:
        for split, n in (("train", n_train), ("test", n_test)):
            for _ in range(n):
                question, answer = sample(samplers[split][name])
                messages = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                out[split].append({"messages": messages, "module": name})
    return out


def write(out_dir: Path, rows: dict[str, list[dict]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for row in items:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1000, help="questions per module, train split")
    p.add_argument("--test", type=int, default=100, help="questions per module, held-out split")
    p.add_argument("--modules", default=",".join(MODULES))
    args = p.parse_args(argv)
    if not os.environ.get("PYTHONHASHSEED", "").isdigit():  # unset or random
        print("warning: PYTHONHASHSEED is not fixed: composed modules will differ run to run", file=sys.stderr)
    write(Path(args.out_dir), generate(args.seed, args.train, args.test, tuple(args.modules.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
