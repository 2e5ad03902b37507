"""The array pool of checkpoint jobs (``lowbit/checkpoint/array_pool.py``) and the direct-I/O
writer (``DirectAppend``): what they change must never show in the arrays or the bytes."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from safetensors.numpy import save_file

from lowbit.checkpoint import array_pool, compress_checkpoint, load
from lowbit.checkpoint.io import DIRECT_BLOCK, DirectAppend, SafetensorsWriter, direct_io_enabled

MiB = 1 << 20

pool_needed = pytest.mark.skipif(array_pool.status() != "pooled large arrays",
                                 reason=f"array pool not in use: {array_pool.status()}")


def handler_name(a: np.ndarray | None = None) -> str:
    from numpy._core.multiarray import get_handler_name

    return get_handler_name() if a is None else get_handler_name(a)


@pool_needed
def test_the_pool_serves_numpy_only_inside_active_and_only_on_that_thread():
    seen = {}
    with array_pool.job(64 * MiB):
        with array_pool.active():
            seen["here"] = handler_name()
            t = threading.Thread(target=lambda: seen.update(other=handler_name()))
            t.start()
            t.join()
            a = np.ones(2 * MiB, np.uint8)
        seen["after"] = handler_name()
    assert seen == {"here": "lowbit_array_pool", "other": "default_allocator", "after": "default_allocator"}
    assert handler_name(a) == "lowbit_array_pool" and a.sum() == 2 * MiB


@pool_needed
def test_a_freed_large_block_is_reused_and_released_when_the_job_ends():
    with array_pool.job(64 * MiB), array_pool.active():
        before = array_pool.stats()
        a = np.empty(8 * MiB, np.uint8)
        address = a.ctypes.data
        del a
        b = np.empty(8 * MiB - 1000, np.uint8)  # fits the free block (at most twice its size)
        assert b.ctypes.data == address
        assert array_pool.stats()["reused"] == before["reused"] + 1
        del b
        assert array_pool.stats()["free_bytes"] >= 8 * MiB
    assert array_pool.stats()["free_bytes"] == 0


@pool_needed
def test_pooled_data_is_page_aligned_and_reused_zeros_are_zero():
    with array_pool.job(64 * MiB), array_pool.active():
        a = np.full(3 * MiB, 0xAB, np.uint8)
        assert a.ctypes.data % 4096 == 0
        del a
        z = np.zeros(3 * MiB, np.uint8)  # calloc on the block just freed, full of 0xAB
        assert not z.any()
        s = np.zeros(100, np.float64)  # small requests: malloc, still zeroed
        assert not s.any()


@pool_needed
def test_the_limit_bounds_the_free_bytes_and_a_miss_evicts_the_oldest():
    with array_pool.job(20 * MiB), array_pool.active():
        blocks = [np.empty(6 * MiB, np.uint8) for _ in range(4)]
        del blocks
        assert array_pool.stats()["free_bytes"] <= 20 * MiB
        big = np.empty(16 * MiB, np.uint8)  # fits none of the free blocks: evicts until it fits the limit
        assert array_pool.stats()["free_bytes"] + big.nbytes <= 20 * MiB + 2 * MiB
        del big


@pool_needed
def test_an_array_that_outlives_its_job_is_unmapped_when_freed():
    with array_pool.job(64 * MiB), array_pool.active():
        keep = np.arange(MiB, dtype=np.int64)
    unmapped = array_pool.stats()["unmapped"]
    assert int(keep[-1]) == MiB - 1
    del keep
    assert array_pool.stats()["unmapped"] == unmapped + 1
    assert array_pool.stats()["free_bytes"] == 0


@pool_needed
def test_resize_keeps_the_values_across_the_small_and_pooled_kinds():
    with array_pool.job(64 * MiB), array_pool.active():
        a = np.arange(1000, dtype=np.int64)
        a.resize(300_000, refcheck=False)  # small -> pooled
        assert (a[:1000] == np.arange(1000)).all() and not a[1000:].any()
        a.resize(2_000_000, refcheck=False)  # pooled -> larger pooled
        assert (a[:1000] == np.arange(1000)).all()
        a.resize(10, refcheck=False)  # pooled, shrunk in place
        assert (a == np.arange(10)).all()


def test_a_job_gives_the_same_bytes_with_and_without_the_pool(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    src = tmp_path / "m.safetensors"
    save_file({f"w{i}": rng.standard_normal((512, 640 + 64 * i)).astype(np.float32) for i in range(5)}, str(src))
    outs = []
    for pooled in (True, False):
        if not pooled:
            monkeypatch.setattr(array_pool, "active", lambda: __import__("contextlib").nullcontext())
        for method in ("int8", "bf16", "prune"):
            out = tmp_path / f"{method}-{pooled}.safetensors"
            compress_checkpoint(src, out, method, workers=2, progress=False)
            outs.append(out.read_bytes())
    assert outs[:3] == outs[3:]


# ---------------------------------------------------------------- direct I/O

def direct_or_skip(path, offset=0, **kw) -> DirectAppend:
    if not direct_io_enabled():
        pytest.skip("no O_DIRECT here")
    path.touch()
    try:
        return DirectAppend(path, offset, **kw)
    except OSError as e:
        pytest.skip(f"the file system refuses direct I/O: {e}")


@pytest.mark.parametrize("sizes", [[5], [4096], [3 * MiB + 17, 1, 4095, 9 * MiB], [8 * MiB, 8 * MiB + 4096]])
def test_direct_append_writes_exactly_the_bytes_appended(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    path = tmp_path / "d.bin"
    w = direct_or_skip(path, 8192)
    for a in arrays:
        w.write(a)
    end = w.close()
    data = path.read_bytes()
    assert end == len(data) == 8192 + sum(sizes)
    assert data[8192:] == b"".join(a.tobytes() for a in arrays)


def test_direct_append_writes_aligned_arrays_from_their_memory_and_others_staged(tmp_path):
    aligned = np.empty(4 * MiB + 4096, np.uint8)
    aligned = aligned[-aligned.ctypes.data % 4096:][:4 * MiB]
    aligned[:] = 7
    odd = np.full(4 * MiB, 9, np.uint8)[1:]
    path = tmp_path / "d.bin"
    w = direct_or_skip(path)
    w.write(aligned)
    w.write(odd)
    w.write(aligned)
    w.close()
    assert path.read_bytes() == aligned.tobytes() + odd.tobytes() + aligned.tobytes()


def test_a_failed_background_write_is_raised_by_close(tmp_path, monkeypatch):
    path = tmp_path / "d.bin"
    w = direct_or_skip(path)
    real = os.pwrite

    def failing(fd, buf, off):
        if len(buf) >= DIRECT_BLOCK and off >= 0:
            raise OSError(28, "No space left on device")
        return real(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", failing)
    w.write(np.zeros(9 * MiB, np.uint8))
    with pytest.raises(OSError, match="No space"):
        w.close()


def test_direct_and_buffered_writers_give_the_same_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate((1, 1000, 3 * MiB // 4 + 5))}
    files = []
    for direct in ("1", "0"):
        monkeypatch.setenv("LOWBIT_DIRECT_IO", direct)
        out = tmp_path / f"o{direct}.safetensors"
        w = SafetensorsWriter(out)
        for k, v in tensors.items():
            w.add(k, v)
        w.commit({"k": "v"})
        files.append(out.read_bytes())
    assert files[0] == files[1]
    got = load(tmp_path / "o1.safetensors", as_numpy=True)
    assert all(np.array_equal(got[k], v) for k, v in tensors.items())


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_direct)
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(out)
    assert w._direct is None
    w.add("x", np.arange(5000, dtype=np.float32))
    w.commit()
    assert np.array_equal(load(out, as_numpy=True)["x"], np.arange(5000, dtype=np.float32))


def test_an_aborted_direct_writer_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(out)
    w.add("x", np.ones(3 * MiB, np.float32))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_the_writer_copies_what_it_queues_unless_told_zero_copy(tmp_path):
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(out)
    a = np.ones(MiB, np.float32)
    w.add("x", a)
    a[:] = 5  # the caller's array changes after add: the file still holds what was added
    w.commit()
    assert (load(out, as_numpy=True)["x"] == 1).all()
