"""The layout's rules, held by the imports themselves: communication lives in dist.py and DeepSpeed's state in
zero/; methods reach both only through their Context and never ask which backend runs; the pure math and the
methods' configs import neither; the library never imports the application (task/) or the tools; nothing outside
a method's folder asks for it by name; and a config check loads no torch, transformers or DeepSpeed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ds_dynrank"
OWNERS = {
    "torch.distributed": "dist.py",
    "deepspeed.comm": "dist.py",
    "deepspeed.utils": "zero/",
    "deepspeed.runtime": "zero/",
    "deepspeed.zero": "zero/",
}
# no DeepSpeed, no process group, no ZeRO state: testable in one plain process
PURE = [
    "config.py",
    "section.py",
    "errors.py",
    "lora.py",
    "inject.py",
    "allocation.py",
    "schedule.py",
    "scores.py",
    "rundir.py",
    "monitor.py",
    "ds_config.py",
    "launch_env.py",
    "backends/base.py",
    "recompute.py",
    "methods/",
    "task/classification.py",
    "task/tables.py",
    "task/sft.py",
    "task/mathgen.py",
    "task/assets.py",
    "task/models.py",
]
# the library, apart from the application it is shipped with and the tools around runs
APPLICATION = ("task/", "tools/", "__main__.py")
IMPURE = ("deepspeed", "ds_dynrank.dist", "ds_dynrank.zero", "torch.distributed")


def _files(prefix: str) -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if _rel(p).startswith(prefix)]


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _is(name: str, api: str) -> bool:
    return name == api or name.startswith(api + ".")


def test_owned_apis_are_imported_only_by_their_owner():
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path):
            for api, owner in OWNERS.items():
                if _is(name, api):
                    assert _rel(path).startswith(owner), f"{_rel(path)} imports {name}; only {owner} may"


def test_pure_modules_and_methods_import_no_deepspeed_process_group_or_zero_state():
    checked = [p for prefix in PURE for p in _files(prefix)]
    assert len(checked) > 20 and any(_rel(p).startswith("methods/l1ra/") for p in checked)
    for path in checked:
        bad = [n for n in _imports(path) if any(_is(n, api) for api in IMPURE)]
        assert not bad, f"{_rel(path)} imports {bad}"


def test_methods_never_ask_which_backend_runs():
    for path in _files("methods/"):
        bad = [
            n for n in _imports(path) if _is(n, "ds_dynrank.backends.masked") or _is(n, "ds_dynrank.backends.physical")
        ]
        assert not bad, f"{_rel(path)} imports {bad}: methods get a SlotMap"
        assert not re.search(r"""["'](masked|physical)["']""", path.read_text()) or _rel(path).endswith("config.py"), (
            f"{_rel(path)} names a backend"
        )


def test_the_library_never_imports_the_application_or_the_tools():
    for path in PACKAGE.rglob("*.py"):
        if _rel(path).startswith(APPLICATION):
            continue
        bad = [n for n in _imports(path) if _is(n, "ds_dynrank.task") or _is(n, "ds_dynrank.tools")]
        assert not bad, f"{_rel(path)} (library) imports {bad}"


def test_nothing_outside_a_methods_folder_asks_for_it_by_name():
    from ds_dynrank.methods.registry import SPECS

    for name in SPECS:
        quoted = re.compile(rf"""["']{name}["']""")
        for path in PACKAGE.rglob("*.py"):
            if _rel(path).startswith(f"methods/{name}/"):
                continue
            assert not quoted.search(path.read_text()), f"{_rel(path)} names method {name!r}"


def test_a_config_check_loads_no_torch_transformers_or_deepspeed():
    """launch/train.py refuses a bad config before the heavy libraries load: checking one must not import them."""
    import subprocess
    import sys

    code = (
        "import sys; from ds_dynrank.config import from_ds_config, load_ds_config, check_deepspeed_compat; "
        "import ds_dynrank; from ds_dynrank import UserInputError; "
        "from_ds_config({'dynrank': {'method': 'l1ra', 'l1ra': {'l1_lambda': 0.1}}}); "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
