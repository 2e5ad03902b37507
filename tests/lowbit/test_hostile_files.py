"""Hostile checkpoints (issue 16): every refusal is a CheckpointError, and none allocates what the file only claims."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from compress.storage import LowRankSVD, MagnitudePrune, NMPrune, StructuredPrune
from lowbit.checkpoint import Chain, Checkpoint, CheckpointError, compress_checkpoint, load
from lowbit.checkpoint.chain import SCHEME_VERSION, checksum_field, parts_digest, seal
from quant import QuantSpec
from quant.storage import IntQuant

BIG = 1 << 15  # a claimed 2-D side: 2^30 elements, 1-4 GiB if allocated


def _lowbit_file(tmp_path: Path, method) -> Path:
    src = tmp_path / "src.safetensors"
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    save_file({"w": w}, str(src))
    out = tmp_path / "out.safetensors"
    compress_checkpoint(src, out, method, progress=False)
    return out


def _rewrite(path: Path, edit, version: int = SCHEME_VERSION) -> Path:
    """Apply ``edit(scheme)`` to tensor w's scheme and recompute its checksum, as an attacker can."""
    with safe_open(str(path), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    lb = json.loads(meta["lowbit"])
    scheme = lb["tensors"]["w"]
    edit(scheme)
    parts = {k[len("w::"):]: v for k, v in tensors.items() if k.startswith("w::")}
    scheme["version"] = version
    scheme.pop(checksum_field(SCHEME_VERSION), None)
    if version == 1:
        scheme["sha256"] = parts_digest(parts)
    else:
        seal(parts, scheme)
    meta["lowbit"] = json.dumps(lb)
    out = path.with_name("hostile.safetensors")
    save_file(tensors, str(out), metadata=meta)
    return out


def _refused_without_allocating(path: Path, match: str | None = None) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


METHODS = {
    "int8": IntQuant(),
    "int4": IntQuant(QuantSpec(bits=4)),
    "magnitude": Chain(MagnitudePrune(0.9), IntQuant()),
    "nm": NMPrune(1, 4),
    "structured": StructuredPrune(0.5),
    "svd": LowRankSVD(rank=2),
}


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_rewritten_shape_is_refused_before_anything_is_allocated(tmp_path, method, version):
    path = _rewrite(_lowbit_file(tmp_path, METHODS[method]), lambda s: s.update(shape=[BIG, BIG]), version)
    _refused_without_allocating(path)


@pytest.mark.parametrize("edit", [
    lambda s: s.update(values_count=1 << 40),
    lambda s: s.update(values_part={"packed": 4, "qmin": -8}),
    lambda s: s["values"]["spec"].update(bits=2),
    lambda s: s["values"]["spec"].update(granularity="PerGroup", size=3),
    lambda s: s.update(shape=[64, 64, 1, 1, 1] * 10),
    lambda s: s.update(shape="64x64"),
    lambda s: s.update(dtype="I64"),
    lambda s: s.update(structure=[]),
    lambda s: s.update(values={"kind": "lz4"}),
    lambda s: s.update(values=None),
], ids=["count", "packing", "bits", "group", "rank", "shape_type", "dtype", "structure", "kind", "values"])
def test_inconsistent_int8_schemes_are_refused_with_the_tensor_named(tmp_path, edit):
    _refused_without_allocating(_rewrite(_lowbit_file(tmp_path, IntQuant()), edit), match="tensor 'w'")


@pytest.mark.parametrize("method, edit", [
    ("nm", lambda s: s["structure"].update(m=1 << 30)),
    ("nm", lambda s: s["structure"].update(n=0, m=4, )),
    ("structured", lambda s: s["structure"].update(small_shape=[BIG, 64])),
    ("structured", lambda s: s["structure"].update(axis=5)),
    ("svd", lambda s: s["factors"]["A"].update(shape=[BIG, 2])),
    ("svd", lambda s: s.update(shape=[64, BIG])),
], ids=["nm_m", "nm_zero", "small_shape", "axis", "factor_shape", "svd_shape"])
def test_inconsistent_structure_schemes_are_refused(tmp_path, method, edit):
    _refused_without_allocating(_rewrite(_lowbit_file(tmp_path, METHODS[method]), edit))


def test_the_checksum_covers_the_scheme(tmp_path):
    path = _lowbit_file(tmp_path, IntQuant())
    with safe_open(str(path), "np") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    lb = json.loads(meta["lowbit"])
    lb["tensors"]["w"]["chain"] = ["something else"]  # no checksum recomputed: a corrupted scheme
    meta["lowbit"] = json.dumps(lb)
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load(tmp_path / "c.safetensors")


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_the_sha256_versions_still_read_bit_for_bit(tmp_path, version):
    path = _lowbit_file(tmp_path, IntQuant())
    want = load(path, as_numpy=True)["w"]
    old = _rewrite(path, lambda s: None, version)
    with safe_open(str(old), "np") as f:
        scheme = json.loads(f.metadata()["lowbit"])["tensors"]["w"]
    assert "blake3" not in scheme and len(scheme["sha256"]) == 64
    np.testing.assert_array_equal(load(old, as_numpy=True)["w"], want)


def test_the_current_checksum_is_blake3_of_the_scheme_and_the_parts(tmp_path):
    import blake3

    path = _lowbit_file(tmp_path, IntQuant())
    with safe_open(str(path), "np") as f:
        tensors, scheme = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lowbit"])["tensors"]["w"]
    parts = {k[len("w::"):]: v for k, v in tensors.items() if k.startswith("w::")}
    inner = blake3.blake3()
    for k in sorted(parts):  # names, dtypes, shapes and bytes, in name order
        inner.update(k.encode() + str(parts[k].dtype).encode() + str(parts[k].shape).encode() + parts[k].tobytes())
    body = json.dumps({k: v for k, v in scheme.items() if k != "blake3"}, sort_keys=True, separators=(",", ":"))
    assert scheme["version"] == 3 and "sha256" not in scheme
    assert scheme["blake3"] == blake3.blake3(body.encode() + inner.hexdigest().encode()).hexdigest()


def _peak_rss_of_reading(path: Path, tmp_path: Path) -> tuple[str, int]:
    """What reading ``path`` in a fresh process ends with, and that process's peak RSS (measured from a
    small parent, since Linux carries a forked process's peak across exec)."""
    from bench.e2e import measure

    result = tmp_path / "result.txt"
    code = ("import sys\nfrom lowbit.checkpoint import Checkpoint, CheckpointError\n"
            "try:\n    ck = Checkpoint(sys.argv[1]); [ck.read(n) for n in ck.names()]; msg = 'read'\n"
            "except CheckpointError as e:\n    msg = f'CheckpointError {e}'\n"
            "open(sys.argv[2], 'w').write(msg)")
    _, rss, _ = measure([sys.executable, "-c", code, str(path), str(result)])
    return result.read_text(), rss


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(1).expand(1 << 14, 1 << 14),                      # stride 0: 1 GiB from 4 bytes
    lambda: torch.as_strided(torch.zeros(1 << 15), (1 << 14, 1 << 14), (1, 1)),  # overlapping rows
], ids=["zero_stride", "overlap"])
def test_a_pickled_stride_bomb_is_refused_before_it_is_materialised(tmp_path, make):
    path = tmp_path / "bomb.pt"
    torch.save({"w": make()}, path)
    assert path.stat().st_size < 200_000
    first, rss = _peak_rss_of_reading(path, tmp_path)
    assert first.startswith("CheckpointError") and "share storage" in first
    assert rss < 700 << 20


@pytest.mark.parametrize("make, what", [
    (lambda: torch.zeros(4, 4).to_sparse(), "sparse"),
    (lambda: torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8), "quantized"),
], ids=["sparse", "quantized"])
def test_pickled_tensors_that_are_not_plain_dense_are_refused(tmp_path, make, what):
    path = tmp_path / "x.pt"
    try:
        torch.save({"w": make()}, path)
    except Exception as e:  # noqa: BLE001 - a torch build that cannot save this kind has nothing to test
        pytest.skip(f"cannot save a {what} tensor here: {e}")
    try:
        Checkpoint(path)
    except CheckpointError as e:
        assert what in str(e) or "refused" in str(e)
    else:
        pytest.fail("a non-dense tensor was accepted")


def _raw_safetensors(path: Path, header: str, data: bytes = b"") -> Path:
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header", [
    '{"w": {"dtype": "F32", "shape": [0, 100000000000000000000], "data_offsets": [0, 0]}}',
    '{"w": {"dtype": "F32", "shape": [0, 4611686018427387903, 4], "data_offsets": [0, 0]}}',
    '{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 0]}}' % ("9" * 4300),
    '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, %s]}}' % ("9" * 4300),
    '{"w": {"dtype": "F32", "shape": [%s, 0], "data_offsets": [0, 0]}}' % ("1" + "0" * 30),
], ids=["zero_by_huge", "zero_by_extent", "4300_digit_dim", "4300_digit_offset", "huge_by_zero"])
def test_absurd_shapes_and_offsets_are_checkpoint_errors(tmp_path, header):
    p = _raw_safetensors(tmp_path / "h.safetensors", header)
    with pytest.raises(CheckpointError, match="h.safetensors"):
        load(p)


def test_a_shard_name_too_long_for_the_file_system_is_a_checkpoint_error(tmp_path):
    save_file({"w": np.ones(4, np.float32)}, str(tmp_path / "a.safetensors"))
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"w": "x" * 300 + ".safetensors"}}))
    with pytest.raises(CheckpointError, match="bad shard file"):
        Checkpoint(idx)
