"""backends/ and cli/ install only inside the redi namespace, editable and as a wheel."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, redi, redi.backends, redi.cli.main, redi.configs, redi.backends.torch_cuda;"
    "assert importlib.util.find_spec('backends') is None and importlib.util.find_spec('cli') is None;"
    "from importlib.resources import files; assert (files('redi.configs') / 'tiny.yaml').is_file();"
    "print(redi.backends.__file__)"
)


def test_editable_install_maps_namespace(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(str(Path("backends") / "__init__.py"))


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build a wheel")
def test_wheel_installs_namespace_only(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(ROOT), "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("redi-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("redi-")}
    assert tops == {"redi"}, tops
    assert "redi/backends/torch_cuda/backend.py" in names and "redi/cli/main.py" in names
    assert "redi/configs/paper/redi.yaml" in names
    # The paper's five benchmark files are package data (redi eval --benchmark math500 works offline).
    for name in ("math", "aime", "amc", "minerva", "olympiad_bench"):
        assert f"redi/evaluation/benchmarks/{name}.json" in names, name
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    # -S and an explicit path: only the wheel's copy of redi can be imported, not the editable checkout.
    code = f"import sys; sys.path[:0] = [{str(site)!r}] + [p for p in {sys.path!r} if 'site-packages' in p]; " + PROBE
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(site))
