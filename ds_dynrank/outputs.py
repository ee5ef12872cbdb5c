"""Files a run leaves in its output directory, each written atomically (temp file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ds_dynrank.lora import LoRALinear


def write_json(path: Path, obj: Any) -> None:
    """Never a half-written file: readers see the old content or the new, nothing in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def allocation(adapters: list[tuple[str, LoRALinear]]) -> dict[str, int]:
    """`{module name: live rank}` for every adapted module, in iteration order."""
    return {name: layer.rank for name, layer in adapters}


def activity(adapters: list[tuple[str, LoRALinear]]) -> dict[str, bool]:
    """`{module name: does it train now}` for every adapted module (module allocation), in iteration order."""
    return {name: layer.trainable for name, layer in adapters}
