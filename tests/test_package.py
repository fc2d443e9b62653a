"""The package: its layers (no module imports upward, checked from the source) and its install.

    bottom (torch-free)   llm_steering.core, .config, .recipe, .chat_history, .console.cli
    library               every other module directly in llm_steering/ (and its non-UI subpackages)
    front ends            llm_steering.console (the console chat), llm_steering.web (the app: the only
                          place besides the root app.py that imports gradio)

Every import counts, also those inside functions: a lazy import upward is still an upward edge.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llm_steering"
BOTTOM = {"llm_steering", "llm_steering.core", "llm_steering.config", "llm_steering.recipe", "llm_steering.chat_history",
          "llm_steering.console", "llm_steering.console.cli"}
FRONT_ENDS = ("llm_steering.console", "llm_steering.web")
UI_LIBRARIES = ("gradio", "spaces")
HEAVY = ("torch", "transformers", "nnsight", "vllm", "gradio", "safetensors", "numpy")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in `path` names (absolute imports; the package uses no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def within(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_has_the_layers_this_test_knows():
    assert "llm_steering.core" in MODULES and "llm_steering.web.app" in MODULES and "llm_steering.console.chat" in MODULES
    assert all(name in MODULES for name in BOTTOM)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not within(m, FRONT_ENDS)))
def test_the_library_imports_no_front_end_and_no_ui_library(module):
    upward = sorted(n for n in MODULES[module] if within(n, FRONT_ENDS) or within(n, UI_LIBRARIES))
    assert not upward, f"{module} imports {upward}: the library must not know its front ends"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if within(m, ("llm_steering.console",))))
def test_the_console_imports_no_web_ui(module):
    upward = sorted(n for n in MODULES[module] if within(n, ("llm_steering.web",)) or within(n, UI_LIBRARIES))
    assert not upward, f"{module} imports {upward}"


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_the_bottom_imports_only_the_bottom_and_nothing_heavy(module):
    outside = sorted(n for n in MODULES[module] if n in MODULES and n not in BOTTOM)  # names that are our modules
    assert not outside, f"{module} imports {outside}, which are above the torch-free bottom"
    heavy = sorted(n for n in MODULES[module] if within(n, HEAVY))
    assert not heavy, f"{module} imports {heavy}"


def test_gradio_is_imported_only_by_the_app_and_the_web_subpackage():
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*.py") if within_any(imports_of(p), UI_LIBRARIES))
    assert users == ["app.py"], users
    users = sorted(m for m, names in MODULES.items() if within_any(names, ("gradio",)))
    assert users and all(within(m, ("llm_steering.web",)) for m in users), users


def within_any(names: set[str], prefixes: tuple[str, ...]) -> bool:
    return any(within(n, prefixes) for n in names)


def test_importing_the_bottom_really_loads_no_torch():
    """The static check above, confirmed by importing: what --help and the config reader need loads no torch."""
    code = ("import sys; import " + ", ".join(sorted(BOTTOM)) +
            "; print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(HEAVY) + "))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "[]", out.stdout


def test_no_file_edits_sys_path_and_no_import_order_pragma():
    offenders = []
    for path in [*ROOT.glob("*.py"), *PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if path.name != Path(__file__).name and ("sys.path.insert" in text or "sys.path.append" in text or "isort: off" in text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_fast_hub_downloads_are_on_in_the_setting_huggingface_hub_reads():
    """hf-xet's high-performance mode, as huggingface_hub itself sees it once the library is imported
    (its constants are read at import: llm_steering sets the variable before that); an explicit
    setting wins. The hf-transfer variable of older hubs is not set: huggingface_hub 2.x ignores it."""
    code = ("import os, steering, huggingface_hub.constants as c; "
            "print(c.HF_XET_HIGH_PERFORMANCE, 'HF_HUB_ENABLE_HF_TRANSFER' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_XET_HIGH_PERFORMANCE", "HF_HUB_ENABLE_HF_TRANSFER")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr[-500:]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "HF_XET_HIGH_PERFORMANCE": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-500:]


def test_pip_install_dot_gives_a_working_library_outside_the_checkout(tmp_path):
    """`pip install .` (here into a folder, without dependencies: they are the venv's) installs the
    package with its data and the `steering` API module, importable from anywhere."""
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--target", str(target), str(ROOT)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-800:]
    code = ("import steering, llm_steering; from llm_steering.web import views; "
            "print(llm_steering.__file__, steering.SteeringComponent.__module__, len(views.strength_curves()), "
            "len(steering.load_vectors().names))")  # the shipped vectors are package data: ten concepts, each learned beside
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    where, module, curves, vectors = out.stdout.split()
    assert where.startswith(str(target)) and module.startswith("llm_steering.") and int(curves) > 0 and int(vectors) == 20
