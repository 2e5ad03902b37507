"""Files lowbit writes and files it refuses to read (issue 16): every case fails with a CheckpointError
or a usage error, leaves the input and any existing file alone, and leaves no temporary behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from bench.quantize import main
from lowbit.checkpoint import Checkpoint, CheckpointError, compress_checkpoint, load
from lowbit.checkpoint.io import SafetensorsWriter, publish, sweep_stale_temporaries, temp_path


def _sharded(tmp_path: Path) -> Path:
    a = {"a": np.ones((8, 8), np.float32)}
    b = {"b": np.full((8, 8), 2.0, np.float32)}
    save_file(a, str(tmp_path / "s1.safetensors"))
    save_file(b, str(tmp_path / "s2.safetensors"))
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return idx


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_report_never_replaces_an_existing_file_or_the_input_index(tmp_path, capsys):
    idx = _sharded(tmp_path)
    before = _listing(tmp_path)
    assert main([str(idx), "--report", str(idx), "--quiet", "--force"]) == 1  # the input's index, even with --force
    assert "input checkpoint" in capsys.readouterr().err
    other = tmp_path / "notes.md"
    other.write_text("mine")
    assert main([str(idx), "--report", str(other), "--quiet"]) == 1  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main([str(idx), "--out", str(tmp_path / "q.json"), "--report", str(tmp_path / "q.json"), "--quiet"]) == 2
    assert _listing(tmp_path) == {**before, "notes.md": b"mine"}
    assert main([str(idx), "--report", str(other), "--quiet", "--force"]) == 0 and other.read_text().startswith("#")


def test_out_over_any_file_of_the_input_is_refused_even_with_force(tmp_path, capsys):
    idx = _sharded(tmp_path)
    before = _listing(tmp_path)
    for target in (idx, tmp_path / "s2.safetensors"):
        assert main([str(idx), "--out", str(target), "--force", "--quiet"]) == 1
        assert "input checkpoint" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_a_fifo_named_like_a_checkpoint_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    code = "import sys\nfrom lowbit.checkpoint import Checkpoint\nCheckpoint(sys.argv[1])"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=120)
    assert "not a regular file" in r.stderr and time.perf_counter() - t0 < 60
    os.unlink(fifo)


def test_an_output_that_appears_during_the_run_is_not_replaced_without_force(tmp_path):
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(out)
    w.add("a", np.ones(4, np.float32))
    out.write_bytes(b"someone else's")  # created after the check, before the rename
    with pytest.raises(CheckpointError, match="appeared there"):
        w.commit()
    assert out.read_bytes() == b"someone else's" and _listing(tmp_path).keys() == {"o.safetensors"}


def test_publish_replaces_only_with_force(tmp_path):
    final, tmp = tmp_path / "f", tmp_path / "t"
    final.write_text("old")
    tmp.write_text("new")
    with pytest.raises(CheckpointError):
        publish(tmp, final, force=False)
    publish(tmp, final, force=True)
    assert final.read_text() == "new" and not tmp.exists()


def test_the_output_is_written_in_one_temporary_file_without_a_copy(tmp_path, monkeypatch):
    src = tmp_path / "m.safetensors"
    # large enough (8 MiB of codes) that the header's reserve is kept, not compacted away
    save_file({f"w{i}": np.random.default_rng(i).standard_normal((2048, 1024)).astype(np.float32) for i in range(4)},
              str(src))
    seen = set()
    real_open = open

    def spy(path, *a, **k):
        if str(path).endswith(".tmp"):
            seen.add(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("lowbit.checkpoint.io.open", spy, raising=False)
    monkeypatch.setattr("shutil.copyfileobj", lambda *a, **k: pytest.fail("the data was copied"))
    compress_checkpoint(src, tmp_path / "q.safetensors", "int8", progress=False)
    assert len(seen) == 1
    assert set(load(tmp_path / "q.safetensors", as_numpy=True)) == {f"w{i}" for i in range(4)}


def test_a_killed_runs_temporaries_are_swept_by_the_next_run(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"w": np.ones((16, 16), np.float32)}, str(src))
    out = tmp_path / "q.safetensors"
    code = ("import sys, os, signal\nfrom lowbit.checkpoint.io import SafetensorsWriter\nimport numpy as np\n"
            "w = SafetensorsWriter(sys.argv[1]); w.add('a', np.ones(1 << 18, np.float32)); w._data.flush()\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(out)], timeout=120)
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].name.startswith(".q.safetensors.lowbit-")
    foreign = tmp_path / ".q.safetensors.something.tmp"  # not lowbit's pattern: never touched
    foreign.write_text("x")
    live = temp_path(out)  # this process is alive: its temporaries are in use
    live.write_text("x")
    compress_checkpoint(src, out, "int8", progress=False)
    assert not stale[0].exists() and foreign.exists() and live.exists()
    assert sweep_stale_temporaries(tmp_path) == []


def test_duplicate_tensor_names_across_shards_are_refused(tmp_path):
    idx = _sharded(tmp_path)
    save_file({"b": np.zeros((8, 8), np.float32), "a": np.zeros((8, 8), np.float32)},
              str(tmp_path / "s2.safetensors"))
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="tensor 'a' is also in shard"):
        Checkpoint(idx)


def test_conflicting_shard_metadata_is_refused(tmp_path):
    idx = _sharded(tmp_path)
    save_file({"a": np.ones((8, 8), np.float32)}, str(tmp_path / "s1.safetensors"), metadata={"format": "pt"})
    save_file({"b": np.ones((8, 8), np.float32)}, str(tmp_path / "s2.safetensors"), metadata={"format": "tf"})
    with pytest.raises(CheckpointError, match="metadata 'format' differs"):
        Checkpoint(idx)


def test_a_shard_linked_to_another_file_does_not_leak_its_bytes(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"hunter2!" + b"x" * 100)
    link = tmp_path / "model.safetensors"
    link.symlink_to(secret)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(link)
    n = int.from_bytes(b"hunter2!", "little")
    assert str(n) not in str(e.value) and "hunter2" not in str(e.value)


def test_a_tensor_name_the_terminal_cannot_encode_prints_and_reports(tmp_path):
    src = tmp_path / "m.safetensors"
    name = "w\udc80"
    header = json.dumps({name: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    header += b" " * (-len(header) % 8)
    src.write_bytes(len(header).to_bytes(8, "little") + header + np.ones(16, np.float32).tobytes())
    r = subprocess.run([sys.executable, "-m", "bench.quantize", str(src), "--quiet", "--report",
                        str(tmp_path / "r.md"), "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "\\udc80" in r.stdout
    assert (tmp_path / "r.md").exists() and json.loads((tmp_path / "r.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_small_checkpoint_is_not_padded_and_the_report_gives_the_files_saving(tmp_path):
    src = tmp_path / "small.safetensors"
    save_file({"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}, str(src))  # 16 KiB
    out = tmp_path / "q.safetensors"
    rep = compress_checkpoint(src, out, "int8", progress=False)
    size = out.stat().st_size
    assert size < 64 * 64 + 64 * 4 + 4096  # the codes, the scales and a header: no 64 KiB reserve
    t = rep.totals
    assert t["file_bytes_before"] == src.stat().st_size and t["file_bytes_after"] == size
    assert t["file_percent_saved"] == pytest.approx(100 * (1 - size / src.stat().st_size))
    assert f"({t['file_percent_saved']:.1f}% saved) as written" in rep.to_table()
    assert np.array_equal(load(out, as_numpy=True)["w"].shape, (64, 64))
