"""The sanitizer job: lowbit's C kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
(``LOWBIT_SANITIZE=1``), and the kernel tests run against them in a fresh process that preloads the
sanitizer runtimes. Any report aborts that process, so the job fails. Marked slow; CI runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = ["tests/quant/test_attention.py", "tests/quant/test_native.py", "tests/quant/test_hardening.py",
                "tests/precision/test_codec.py", "tests/quant/test_ptq.py", "tests/precision/test_blocks.py",
                "tests/precision/test_native_codec.py", "tests/precision/test_metrics_kernel.py",
                "tests/compress/test_prune_kernel.py"]
POOL_TESTS = ["tests/lowbit/test_array_pool.py", "tests/lowbit/test_row_blocks.py"]


def _runtime(name: str) -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and Path(path).exists() else None


@pytest.mark.slow
def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if asan is None or ubsan is None:
        pytest.skip("gcc with libasan and libubsan is needed for the sanitizer job")
    env = {**os.environ, "LOWBIT_SANITIZE": "1", "LOWBIT_CACHE_DIR": str(tmp_path / "cache"),
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1",
           "LD_PRELOAD": f"{asan} {ubsan}", "CC": shutil.which("gcc") or "gcc"}
    env.pop("LOWBIT_NATIVE", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                        *KERNEL_TESTS], env=env, capture_output=True, text=True, timeout=3000,
                       cwd=Path(__file__).resolve().parents[1])
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    out = r.stdout + r.stderr
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out and "[100%]" in r.stdout, tail
    # the libraries under test really were the sanitized builds
    code = ("from quant._native import library, attention_library; from precision.codec import _KERNELS\n"
            "from precision.blocks import _BLOCK_KERNELS\n"
            "print(all(l is not None for l in (library(), attention_library(), _KERNELS.get(), _BLOCK_KERNELS.get())))")
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.strip() == "True", probe.stderr[-2000:]
    built = subprocess.run(["nm", "-D", str(next((tmp_path / "cache").glob("int8_kernels-*.so")))],
                           capture_output=True, text=True).stdout if shutil.which("nm") else "__asan"
    assert "__asan" in built
    # the array pool is off in sanitized runs (so ASan sees every array's own allocation) but for its own
    # tests and the jobs that use it, run here with it on: its headers, small blocks and realloc under ASan
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                        *POOL_TESTS], env={**env, "LOWBIT_ARRAY_POOL": "1"}, capture_output=True, text=True,
                       timeout=1200, cwd=Path(__file__).resolve().parents[1])
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-3000:]
    probe = subprocess.run([sys.executable, "-c", "from lowbit.checkpoint import array_pool; print(array_pool.status())"],
                           env={**env, "LOWBIT_ARRAY_POOL": "1"}, capture_output=True, text=True, timeout=600)
    assert probe.stdout.strip() == "pooled large arrays", probe.stdout + probe.stderr[-2000:]
