"""The checkpoint reader and writer on hostile or broken input: only CheckpointError, nothing runs,
nothing partial is left behind."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import lowbit
from lowbit.checkpoint import Checkpoint, CheckpointError, SafetensorsFile, SafetensorsWriter
from bench.quantize import main


def st_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


DUP = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("blob, msg", [
    (b"", "not a safetensors file"),
    (b"\x00" * 5, "not a safetensors file"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length field exceeds"),
    (struct.pack("<Q", 5) + b"{bad}", "not valid JSON"),
    (st_bytes(GOOD, b"\x00" * 4), "past the end"),
    (st_bytes(GOOD, b"\x00" * 12), "trailing junk"),
    (st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8), "expected"),
    (st_bytes({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 8), "unsupported dtype"),
    (st_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\x00" * 8), "bad shape"),
    (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12), "overlaps"),
    (struct.pack("<Q", len(DUP)) + DUP + b"\x00", "twice"),
])
def test_broken_safetensors_give_errors_naming_the_file(tmp_path, blob, msg):
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CheckpointError, match=msg) as e:
        Checkpoint(p)
    assert "x.safetensors" in str(e.value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), flip=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 400))
def test_fuzzed_files_raise_only_checkpoint_errors(tmp_path, data, flip, cut):
    """Random bodies and mutated valid files: CheckpointError or a valid read, nothing else."""
    base = bytearray(st_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                               "i": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}, bytes(24)))
    for pos, val in flip:
        if pos < len(base):
            base[pos] = val
    for blob in (data, bytes(base[:cut] if cut < len(base) else base)):
        p = tmp_path / "f.safetensors"
        p.write_bytes(blob)
        try:
            ck = Checkpoint(p)
            for n in ck.names():
                ck.read(n)
        except CheckpointError:
            pass


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    assert main([str(p), "--quiet"]) == 1
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()


def test_shard_index_errors(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "s1.safetensors"))
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(idx)
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing from the shard"):
        Checkpoint(idx)
    idx.write_text(json.dumps({"weight_map": {"a": "../s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="bad shard"):
        Checkpoint(idx)


def test_corrupted_part_is_caught_by_the_checksum_and_named(tmp_path):
    save_file({"w": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)},
              str(tmp_path / "m.safetensors"))
    out = tmp_path / "q.safetensors"
    assert main([str(tmp_path / "m.safetensors"), "--out", str(out), "--quiet"]) == 0
    f = SafetensorsFile(out)
    _, _, b, _ = f.entries["w::values"]
    blob = bytearray(out.read_bytes())
    blob[f.data_start + b] ^= 0x01
    out.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="'w'.*checksum"):
        lowbit.load(out)


def test_failed_write_leaves_no_partial_output_and_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous")
    w = SafetensorsWriter(out, force=True)
    w.add("a", np.ones(4, np.float32))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(CheckpointError, match="No space left"):
        w.commit()
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]


def test_read_only_output_directory_is_named(tmp_path, monkeypatch, capsys):
    """A directory we may not write into: a one-line error naming it, exit 1, nothing written.
    (CI runs as root, which chmod cannot stop, so the refusal is simulated where the writer opens its file.)"""
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "m.safetensors"))
    d = tmp_path / "ro"
    d.mkdir()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("lowbit.checkpoint.io.open", refuse, raising=False)
    assert main([str(tmp_path / "m.safetensors"), "--out", str(d / "o.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "ro" in err and "Permission denied" in err and len(err.splitlines()) == 1
    assert list(d.iterdir()) == []


def test_two_concurrent_writers_leave_one_complete_valid_file(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "m.safetensors"
    save_file({f"w{i}": np.random.default_rng(i).standard_normal((64, 256)).astype(np.float32) for i in range(8)},
              str(src))
    out = tmp_path / "q.safetensors"
    cmds = [[sys.executable, "-m", "bench.quantize", str(src), "--method", m, "--out", str(out), "--force", "--quiet"]
            for m in ("int8", "bf16")]
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    back = lowbit.load(out, as_numpy=True)  # checksums verified: one run's complete output
    assert sorted(back) == [f"w{i}" for i in range(8)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
