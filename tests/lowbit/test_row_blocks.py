"""Tensors read and encoded by blocks of rows (``process_tensor``'s streaming path) give what the
whole tensor gives: the same parts, scheme and output bytes, metrics equal to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import lowbit.checkpoint.pipeline as pipeline
from lowbit.checkpoint import Chain, Checkpoint, CheckpointError, compress_checkpoint, compress_tensor, load
from lowbit.checkpoint.chain import compress_row_blocks, rows_streamable
from quant import IntQuant, PerGroup, QuantSpec

METHODS = {"int8": "int8", "int4 g32": Chain(values=IntQuant(QuantSpec(bits=4, granularity=PerGroup(32)))),
           "fp8": "fp8_e4m3fn", "bf16": "bf16", "fp16": "fp16"}


def as_chain(method):
    return method if isinstance(method, Chain) else Chain.parse(method)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("block_bytes", [1, 3 * 96 * 4 + 8, 1 << 20])
def test_blocks_of_rows_give_the_parts_and_scheme_of_the_whole_tensor(tmp_path, method, block_bytes):
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((37, 96)) * rng.uniform(0.01, 3, (37, 1))).astype(np.float32)
    save_file({"w": a}, str(tmp_path / "m.safetensors"))
    chain = as_chain(METHODS[method])
    assert rows_streamable(chain, a.shape)
    whole = compress_tensor("w", a, chain, keep_approx=False)
    ck = Checkpoint(tmp_path / "m.safetensors")
    got = compress_row_blocks("w", a.shape, a.dtype, ck.row_blocks("w", block_bytes), chain)
    assert got is not None
    assert got.scheme == whole.scheme
    assert got.parts.keys() == whole.parts.keys()
    assert all(np.array_equal(got.parts[k], whole.parts[k]) for k in got.parts)
    for field in ("mse", "rel_error", "sqnr_db", "max_abs_error", "cosine"):
        assert getattr(got.row, field) == pytest.approx(getattr(whole.row, field), rel=1e-12)
    assert (got.row.bytes_before, got.row.bytes_after, got.row.shape) == (a.nbytes, whole.row.bytes_after, a.shape)


@pytest.mark.parametrize("method", ["int8", "bf16", "prune"])
def test_a_job_writes_the_same_bytes_streamed_or_whole(tmp_path, monkeypatch, method):
    rng = np.random.default_rng(1)
    bad = rng.standard_normal((64, 40)).astype(np.float32)
    bad[50, 3] = np.nan  # in a late block: the tensor is read again whole and kept
    save_file({"a": rng.standard_normal((300, 48)).astype(np.float32), "bad": bad,
               "v": rng.standard_normal(48).astype(np.float32)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setattr(pipeline, "STREAM_BLOCK_BYTES", 1000)
    streamed = compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "s.safetensors", method, progress=False)
    monkeypatch.setattr(pipeline, "rows_streamable", lambda *a: False)
    whole = compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "w.safetensors", method, progress=False)
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    assert [k.name for k in streamed.kept] == [k.name for k in whole.kept] and "bad" in [k.name for k in whole.kept]
    assert np.array_equal(load(tmp_path / "s.safetensors", as_numpy=True)["bad"], bad, equal_nan=True)


def test_row_blocks_cover_the_rows_in_order_from_a_file_and_from_a_state_dict(tmp_path):
    a = np.arange(7 * 5 * 3, dtype=np.float32).reshape(7, 5, 3)
    save_file({"t": a}, str(tmp_path / "m.safetensors"))
    torch.save({"t": torch.from_numpy(a)}, tmp_path / "m.pt")
    for path in (tmp_path / "m.safetensors", tmp_path / "m.pt"):
        blocks = [(r0, r1, b.copy()) for r0, r1, b in Checkpoint(path).row_blocks("t", 2 * 5 * 3 * 4)]
        assert [(r0, r1) for r0, r1, _ in blocks] == [(0, 2), (2, 4), (4, 6), (6, 7)]
        assert np.array_equal(np.concatenate([b for _, _, b in blocks]), a)


def test_row_blocks_of_a_file_cut_short_name_the_tensor(tmp_path):
    save_file({"t": np.ones((64, 64), np.float32)}, str(tmp_path / "m.safetensors"))
    ck = Checkpoint(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:  # truncated after the header was read
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(CheckpointError, match="'t'.*file ended"):
        list(ck.row_blocks("t", 1 << 10))


def test_a_read_error_in_a_row_block_reaches_the_caller_as_it_was_raised(tmp_path, monkeypatch):
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "m.safetensors"))

    def cut_short(self, name, block_bytes):
        raise CheckpointError(f"{self.path}: tensor {name!r}: file ended within rows 0..64")
        yield  # a generator, as the real one

    monkeypatch.setattr(Checkpoint, "row_blocks", cut_short)
    with pytest.raises(CheckpointError) as e:
        compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "int8", progress=False)
    assert str(e.value).count("tensor 'w'") == 1 and "file ended" in str(e.value)
    assert not list(tmp_path.glob("o.safetensors*")) and not list(tmp_path.glob(".o.safetensors*"))
