"""The layering contract (docs/architecture.md, declared in xray.LAYERS): xray/ imports only downward, never the UI, the CLI or
the bench; lazy imports only for optional heavy packages; and the one place the app works around
Streamlit's legacy pages/ mode still matches the Streamlit installed."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xray"
# optional heavy packages, imported where they are used: DICOM, Grad-CAM, the bench's reference network,
# DDP, the terminal progress bar, and the report writers (fpdf2, highdicom: only `report` and the page's
# downloads need them), and the DICOM network (pynetdicom: only `python -m xray node` needs it)
LAZY_ALLOWED = {"pydicom", "pytorch_grad_cam", "torchvision", "torch.distributed", "tqdm", "pillow_heif", "fpdf",
                "highdicom", "pynetdicom"}


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_engine_has_no_import_cycle_between_modules_or_wings_counting_imports_inside_functions():
    tool = _graph()
    graph = {k: v for k, v in tool.edges().items() if k not in ("__init__", "__main__")}
    assert tool.cycles(graph) == []
    assert tool.cycles({k: v for k, v in tool.wing_edges().items() if k not in ("__init__", "__main__")}) == []


def test_every_import_points_down_the_declared_layers():
    """xray.LAYERS is the one declaration of the order; every module belongs to exactly one layer."""
    import xray

    rank = {name: i for i, layer in enumerate(xray.LAYERS) for name in layer}
    tool = _graph()
    upward = []
    for module, targets in tool.edges().items():
        if module == "__init__":
            continue
        assert tool.wing_of(module) in rank, f"{module}: add its wing to xray.LAYERS"
        for target in targets:
            if rank[tool.wing_of(target)] > rank[tool.wing_of(module)]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_package_top_holds_at_most_eight_modules_and_every_wing_is_a_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (folder / "__init__.py").is_file(), folder.name


def test_nothing_in_the_engine_imports_the_cli_the_bench_or_streamlit():
    tool = _graph()
    for module, targets in tool.edges().items():
        if module not in ("cli", "__main__"):
            assert "cli" not in targets, module
            assert "bench" not in targets or module == "cli", module
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "streamlit" for n in names), path.name


def test_imports_inside_functions_are_only_optional_heavy_packages():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                else:
                    continue
                for name in names:
                    if not any(name == allowed or name.startswith(allowed + ".") for allowed in LAZY_ALLOWED):
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    assert offenders == []


def test_no_hand_kept_floor_labels_remain():
    """The order lives in xray.LAYERS only; docstring labels like "Floor 2" drifted from the code before."""
    import re

    labelled = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if re.search(r"\bFloor \d", p.read_text())]
    assert labelled == []


@pytest.mark.slow
def test_import_xray_works_in_a_fresh_interpreter_whatever_module_comes_first():
    names = sorted("xray" if m == "__init__" else f"xray.{m}" for m in _graph().modules() if m != "__main__")
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    for m in [k for k in sys.modules if k.startswith('xray')]:\n" \
           "        del sys.modules[m]\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-800:]


def test_the_legacy_pages_mode_workaround_still_matches_streamlit():
    """pages/common.py ensure_app_navigation reads this private flag: Streamlit has no public setting
    that turns the pages/ folder's legacy mode off (st.navigation ends it only after its first run).
    If an upgrade renames or removes it, this test fails and the workaround must be revisited."""
    from streamlit.commands import navigation
    from streamlit.runtime.pages_manager import PagesManager

    assert hasattr(PagesManager, "uses_pages_directory")
    assert "PagesManager.uses_pages_directory = False" in Path(navigation.__file__).read_text()
    common = (ROOT / "pages" / "common.py").read_text()
    assert common.count("uses_pages_directory") == 1  # the workaround lives in one place
    pages = [p.name for p in (ROOT / "pages").glob("*.py")]
    assert sum("PagesManager" in (ROOT / "pages" / name).read_text() for name in pages) == 1
