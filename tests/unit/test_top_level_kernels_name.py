"""The repository's ``kernels/`` folder (``splitserve.kernels``) must not hide
PyPI's ``kernels`` (Hugging Face's hub kernels, required by transformers >=
5.25) when the repository root is on sys.path, as under ``python -m pytest``
or a bench script: transformers then imports names from it and fails."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.path.insert(0, {root!r})
import kernels
import splitserve.kernels
print(kernels.__file__)
print(splitserve.kernels.__file__)
"""


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_splitserve_kernels_stays_ours_and_top_level_kernels_is_not_this_folder() -> None:
    top, ours = _run(PROBE.format(root=str(ROOT)))
    assert Path(ours) == ROOT / "kernels" / "__init__.py"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert Path(top) == ROOT / "kernels" / "__init__.py"  # nothing else to find: ours stays
    else:
        assert not Path(top).is_relative_to(ROOT / "kernels")


def test_transformers_imports_with_the_root_first_on_sys_path() -> None:
    pytest.importorskip("transformers")
    [name] = _run(f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                  "import transformers.activations; print('ok')")
    assert name == "ok"
