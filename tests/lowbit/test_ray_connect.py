"""Joining a Ray cluster that is not there: one error naming the address, within the timeout, no hang."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from bench.quantize import main as cli
from lowbit.checkpoint import SafetensorsWriter, compress_checkpoint
from lowbit.checkpoint import distributed

ray = pytest.importorskip("ray", reason="the Ray executor needs lowbit[ray]")


@pytest.fixture
def no_session():
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    with SafetensorsWriter(tmp_path / "m.safetensors") as w:
        w.add("w", np.ones((8, 8), np.float32))
        w.commit()
    return tmp_path / "m.safetensors"


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_nothing_listens_fails_at_once_naming_it(no_session, ckpt, tmp_path, capsys, scheme):
    addr = f"{scheme}127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    rc = cli([str(ckpt), "--executor", "ray", "--address", addr, "--out", str(tmp_path / "o.safetensors"), "--quiet"])
    assert rc == 1 and time.monotonic() - t0 < 20
    err = capsys.readouterr().err.strip()
    assert addr in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
    assert not ray.is_initialized()


def test_a_cluster_that_never_answers_times_out_naming_the_address(no_session, ckpt, monkeypatch):
    def hang(**kwargs):
        time.sleep(60)

    monkeypatch.setattr(distributed, "_host_port", lambda address: None)  # no TCP probe: the join itself hangs
    monkeypatch.setattr(ray, "init", hang)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"Ray cluster at head:1234: no answer within 0.5 s"):
        compress_checkpoint(ckpt, None, "int8", executor="ray", address="head:1234", connect_timeout=0.5,
                            progress=False)
    assert time.monotonic() - t0 < 10


def test_the_timeout_is_validated(ckpt, capsys):
    assert cli([str(ckpt), "--executor", "ray", "--address", "x:1", "--connect-timeout", "0"]) == 2
    with pytest.raises(ValueError, match="connect_timeout"):
        distributed.RaySession("x:1", 1, connect_timeout=-1)
