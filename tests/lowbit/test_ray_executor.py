"""compress_checkpoint(..., executor="ray") on a local Ray cluster of 2 CPUs: the same output bytes
and report rows as a local run, a worker killed mid-job, a failing job leaving nothing behind."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.quantize import main as cli
from lowbit.checkpoint import Chain, CheckpointError, SafetensorsWriter, compress_checkpoint
from quant import IntQuant, PerChannel, QuantSpec

ray = pytest.importorskip("ray", reason="the Ray executor needs lowbit[ray]")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module (its start-up takes seconds); jobs reuse it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _checkpoint(path: Path, tensors: int, rows: int, cols: int) -> Path:
    rng = np.random.default_rng(0)
    with SafetensorsWriter(path) as w:
        for i in range(tensors):
            w.add(f"layers.{i}.weight", rng.standard_normal((rows, cols)).astype(np.float32))
            w.add(f"layers.{i}.bias", rng.standard_normal(cols).astype(np.float32))  # kept: 1-D
        bad = rng.standard_normal((8, 8)).astype(np.float32)
        bad[0, 0] = np.nan
        w.add("nan.weight", bad)  # kept: holds NaN
        w.commit()
    return path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _rows(report) -> list:
    return [t.__dict__ for t in report.tensors] + [k.__dict__ for k in report.kept]


@pytest.mark.parametrize("method", ["int8", "prune,int4", "fp8_e4m3fn"])
def test_ray_output_and_report_rows_are_byte_identical_to_a_local_run(cluster, tmp_path, method):
    src = _checkpoint(tmp_path / "m.safetensors", 6, 64, 96)
    local = compress_checkpoint(src, tmp_path / "local.safetensors", method, progress=False)
    remote = compress_checkpoint(src, tmp_path / "ray.safetensors", method, progress=False, executor="ray")
    assert _sha(tmp_path / "local.safetensors") == _sha(tmp_path / "ray.safetensors")
    assert _rows(local) == _rows(remote) and local.totals == remote.totals
    assert remote.meta["threads"].startswith("Ray: 2 CPU(s)")


def test_a_worker_killed_mid_job_still_gives_the_complete_identical_output(cluster, tmp_path):
    src = _checkpoint(tmp_path / "m.safetensors", 24, 512, 512)
    chain = Chain(values=IntQuant(QuantSpec(bits=8, granularity=PerChannel(0)), calibration="mse"))  # slow tasks
    compress_checkpoint(src, tmp_path / "local.safetensors", chain, progress=False)
    killed: list[int] = []
    result: dict = {}

    def job() -> None:
        try:
            result["report"] = compress_checkpoint(src, tmp_path / "ray.safetensors", chain, progress=False,
                                                   executor="ray")
        except BaseException as e:  # reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    deadline = time.monotonic() + 60
    while not killed and t.is_alive() and time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::_compress_task"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                break
        time.sleep(0.005)
    t.join(300)
    assert killed, "no task was seen running to kill"
    assert "error" not in result, result.get("error")
    assert _sha(tmp_path / "local.safetensors") == _sha(tmp_path / "ray.safetensors")


def test_a_job_that_fails_in_a_task_leaves_no_output(cluster, tmp_path):
    src = tmp_path / "m.safetensors"
    with SafetensorsWriter(src) as w:
        w.add("a.weight", np.ones((4, 8), np.float32))
        w.add("b.weight", np.array([[-3e38, 3e38, 0, 1]], np.float32))  # no float32 affine scale spans this
        w.commit()
    chain = Chain(values=IntQuant(QuantSpec(bits=8, symmetric=False, granularity=PerChannel(0))))
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="b.weight.*too wide"):
        compress_checkpoint(src, out, chain, progress=False, executor="ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no output, no temporary


def test_the_cli_runs_on_ray_with_the_same_bytes(cluster, tmp_path, capsys):
    src = _checkpoint(tmp_path / "m.safetensors", 3, 32, 64)
    assert cli([str(src), "--out", str(tmp_path / "a.safetensors"), "--quiet"]) == 0
    assert cli([str(src), "--out", str(tmp_path / "b.safetensors"), "--quiet", "--executor", "ray"]) == 0
    assert _sha(tmp_path / "a.safetensors") == _sha(tmp_path / "b.safetensors")
    capsys.readouterr()
    assert cli([str(src), "--address", "auto"]) == 2
    assert "--address applies to --executor ray only" in capsys.readouterr().err
