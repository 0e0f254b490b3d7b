"""A release as a new user meets it: `python -m build` makes an sdist and a wheel without warnings, twine
passes both, and the wheel, installed (not editable) into a fresh venv, runs from an empty folder with the
shipped recipes and benchmark files. The venv reuses this environment's dependencies through a .pth file,
so nothing is downloaded."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WARNING = re.compile(r"(?i)\bwarning\b|deprecat|would be ignored|absent from")

pytest.importorskip("build", reason="needs the build package (the test extra)")
pytest.importorskip("twine", reason="needs twine (the test extra)")
if int(pytest.importorskip("setuptools").__version__.split(".")[0]) < 77:
    pytest.skip("needs setuptools>=77 for the SPDX license field (the test extra)", allow_module_level=True)


def build_release(dist: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # else "byte-compiling is disabled"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A venv whose own site-packages holds only the wheel; this environment's packages are reached via a .pth."""
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "_outer_env.pth").write_text("".join(f"{p}\n" for p in outer))  # after the venv's own site-packages
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", "--no-compile", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return site


def test_release_builds_cleanly_and_the_installed_wheel_runs_by_name(tmp_path):
    dist = tmp_path / "dist"
    log = build_release(dist)
    assert not [line for line in log.splitlines() if WARNING.search(line)], log[-3000:]
    wheel, sdist = next(dist.glob("redi-*.whl")), next(dist.glob("redi-*.tar.gz"))
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(f"redi-{VERSION}.dist-info/METADATA").decode()
        assert zf.read(f"redi-{VERSION}.dist-info/licenses/LICENSE").decode() == license_text
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    with tarfile.open(sdist) as tf:
        assert tf.extractfile(f"redi-{VERSION}/LICENSE").read().decode() == license_text

    site = fresh_venv(tmp_path / "venv", wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    def redi(*args: str) -> str:
        proc = subprocess.run([str(tmp_path / "venv" / "bin" / "redi"), *args], capture_output=True, text=True,
                              cwd=empty, env=env, timeout=300)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        return proc.stdout

    where = subprocess.check_output([tmp_path / "venv" / "bin" / "python", "-c", "import redi; print(redi.__file__)"],
                                    cwd=empty, env=env, text=True)
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not the editable checkout
    assert redi("--version").strip() == f"redi {VERSION}"
    listed = {line.split()[0] for line in redi("config", "list").splitlines()}
    assert listed == {p.relative_to(ROOT / "configs").with_suffix("").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    dpo = yaml.safe_load((ROOT / "configs" / "paper" / "dpo.yaml").read_text())
    shown = redi("train", "--config", "paper/dpo", "--dry-run")
    assert "objective: dpo" in shown and f"beta: {dpo['beta']}" in shown and f"output: {dpo['output']}" in shown
    sft = redi("train", "--config", "paper/sft", "--model", "M", "--data", "D", "--dry-run")
    assert "model: M" in sft and "data: D" in sft and "output: runs/paper-sft-5ep" in sft and "rope_theta: 300000" in sft
    plan = redi("eval", "--benchmark", "aime24", "--limit", "1", "--dry-run")
    assert f"aime24: 1 problem from {site / 'redi' / 'evaluation' / 'benchmarks' / 'aime.json'}" in plan
    assert not any(empty.iterdir())  # dry runs write nothing
