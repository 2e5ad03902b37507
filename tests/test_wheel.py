"""The wheel ships everything: built from this tree, installed (no editable path) in a fresh virtual
environment that borrows the test environment's dependencies, it runs ``python -m bench.smoke``, a job
through every C kernel, and every kernel is found and used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None,
                    reason="no C compiler: the kernels cannot be built here")
def test_the_installed_wheel_runs_a_job_through_every_c_kernel(tmp_path):
    wheels = tmp_path / "wheels"
    # a clean copy: an editable install's egg-info (its SOURCES.txt) or an old build/ would add files the
    # declared package data leaves out
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__", ".git",
                                                             ".hypothesis", ".pytest_cache", "tests"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    if r.returncode:  # no setuptools in this environment: let pip fetch the build backend
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("lowbit-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cache = tmp_path / "cache"  # a fresh kernel cache: each kernel is built from the wheel's own sources
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "LOWBIT_CACHE_DIR": str(cache / "lowbit")}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(py), "-c", "import precision, lowbit; print(precision.__file__); print(lowbit.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert all(w.startswith(site) for w in where), where  # the wheel's copy, not this tree
    r = subprocess.run([str(py), "-m", "bench.smoke"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    n = len([c for c in ROOT.glob("*/**/*.c") if c.relative_to(ROOT).parts[0] in ("precision", "quant", "compress",
                                                                               "lowbit")])
    assert f"{n} of {n} kernels used" in r.stdout  # every C source of this tree is in the wheel and used
