"""Communication lives in dist.py, ZeRO state in zero.py; the pure modules import neither."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ds_dynrank"
PURE = {
    "config.py",
    "errors.py",
    "data.py",
    "outputs.py",
    "monitor.py",
    "ds_config.py",
    "lora.py",
    "inject.py",
    "allocation.py",
    "schedule.py",
}
OWNERS = {"torch.distributed": {"dist.py"}, "deepspeed.comm": {"dist.py"}, "deepspeed.utils": {"zero.py"},
          "deepspeed.runtime": {"zero.py"}, "deepspeed.zero": {"zero.py"}}  # fmt: skip


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_owned_apis_are_imported_only_by_their_owner():
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path):
            for api, owners in OWNERS.items():
                if name == api or name.startswith(api + "."):
                    assert path.name in owners, f"{path.name} imports {name}; only {owners} may"


def test_pure_modules_import_no_deepspeed():
    for name in PURE:
        bad = [n for n in _imports(PACKAGE / name) if n.split(".")[0] == "deepspeed" or n == "ds_dynrank.dist"]
        assert not bad, f"{name} imports {bad}"


def test_a_config_check_loads_no_torch_transformers_or_deepspeed():
    """launch/train.py refuses a bad config before the heavy libraries load: checking one must not import them."""
    import subprocess
    import sys

    code = ("import sys; from ds_dynrank.config import from_ds_config, load_ds_config, check_deepspeed_compat; "
            "import ds_dynrank; from ds_dynrank import UserInputError; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
