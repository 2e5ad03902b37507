"""The checkpoint pipeline as a library: compress_checkpoint / load, the method registry, scheme v1."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bench.quantize import main
from compress.storage import LowRankSVD, MagnitudePrune, NMPrune, StructuredPrune
from lowbit.checkpoint import Chain, CheckpointError, SafetensorsWriter, compress_checkpoint, compress_tensor, load, restore
from precision.cast import FloatCast
from precision.methods import registered_methods
from quant import PerChannel, PerGroup, QuantSpec
from quant.storage import IntQuant

DATA = Path(__file__).parent / "data"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path / "src.safetensors"
    save_file({"a.weight": rng.standard_normal((32, 64)).astype(np.float32),
               "b.weight": rng.standard_normal((16, 32)).astype(np.float32),
               "b.bias": rng.standard_normal(16).astype(np.float32)}, str(p))
    return p


@pytest.mark.parametrize("argv, method", [
    (["--method", "int8"], IntQuant(QuantSpec(granularity=PerChannel(0)))),
    (["--method", "int4", "--granularity", "group", "--group-size", "16", "--affine"],
     IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16)))),
    (["--method", "prune,int8", "--sparsity", "0.5"],
     Chain(MagnitudePrune(0.5), IntQuant(QuantSpec(granularity=PerChannel(0))))),
    (["--method", "prune,fp8_e4m3fn", "--prune", "2:4"], Chain(NMPrune(2, 4), FloatCast("fp8_e4m3fn", "channel"))),
    (["--method", "svd,fp16", "--rank-ratio", "0.25"], Chain(LowRankSVD(ratio=0.25), FloatCast("fp16"))),
    (["--method", "prune", "--prune", "structured", "--sparsity", "0.25"], StructuredPrune(0.25)),
])
def test_python_api_and_cli_write_the_same_bytes(tmp_path, source, argv, method):
    cli, api = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    assert main([str(source), *argv, "--out", str(cli), "--quiet"]) == 0
    report = compress_checkpoint(source, api, method, progress=False)
    assert _sha(cli) == _sha(api)
    back = load(api, as_numpy=True)
    assert set(back) == {"a.weight", "b.weight", "b.bias"}
    assert report.totals["bytes_after"] < report.totals["bytes_before"]


def test_method_names_resolve_to_the_cli_defaults(tmp_path, source):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    compress_checkpoint(source, a, "prune,int8", progress=False)
    assert main([str(source), "--method", "prune,int8", "--out", str(b), "--quiet"]) == 0
    assert _sha(a) == _sha(b)


def test_a_one_percent_sparse_tensor_is_stored_dense_and_reports_no_saving(tmp_path):
    w = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    src = tmp_path / "w.safetensors"
    save_file({"w": w}, str(src))
    out = tmp_path / "q.safetensors"
    rep = compress_checkpoint(src, out, MagnitudePrune(0.01), progress=False)
    row = rep["w"]
    assert row.bytes_after == w.nbytes == 262144
    assert row.ratio == 1.0
    stored = load_file(str(out))
    assert set(stored) == {"w::values"} and stored["w::values"].shape == w.shape
    back = load(out, as_numpy=True)["w"]
    assert np.count_nonzero(back == 0) == round(0.01 * w.size)


def test_a_sparse_int8_tensor_keeps_the_mask_only_where_it_is_smaller():
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    int8 = IntQuant(QuantSpec(granularity=PerChannel(0)))
    for sparsity, has_mask in ((0.05, False), (0.5, True)):
        c = compress_tensor("w", w, Chain(MagnitudePrune(sparsity), int8))
        assert ("mask" in c.parts) == has_mask
        assert np.array_equal(restore("w", c.scheme, c.parts), c.approx)


@pytest.mark.parametrize("chain", [
    Chain(values=FloatCast("bf16")), Chain(values=FloatCast("fp8_e5m2", "tensor")),
    Chain(values=IntQuant(QuantSpec(bits=3, symmetric=False, granularity=PerGroup(8)))),
    Chain(MagnitudePrune(0.7)), Chain(NMPrune(1, 4), IntQuant(QuantSpec(granularity=PerChannel(0)))),
    Chain(StructuredPrune(0.5, axis=1, norm=1), FloatCast("fp16")),
    Chain(LowRankSVD(rank=3), IntQuant(QuantSpec(bits=4, granularity=PerChannel(0)))),
])
def test_every_method_reads_back_exactly_what_its_report_measured(chain):
    w = np.random.default_rng(3).standard_normal((24, 32)).astype(np.float32)
    c = compress_tensor("w", w, chain)
    assert np.array_equal(restore("w", c.scheme, c.parts), c.approx)
    assert c.row.bytes_after == sum(p.nbytes for p in c.parts.values()) < w.nbytes


def test_every_method_is_registered_by_name():
    names = registered_methods()
    assert {"none", "float", "int"} <= set(names["values"])
    assert {"none", "magnitude", "nm", "structured", "svd"} <= set(names["structure"])


def test_checkpoints_written_before_the_method_refactor_still_load():
    expected = load_file(str(DATA / "v1_expected.safetensors"))
    for key, want in expected.items():
        tag, name = key.split("/", 1)
        got = load(DATA / f"v1_{tag}.safetensors", as_numpy=True)[name]
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), key


def test_the_current_writer_reproduces_the_version_1_files_byte_for_byte(tmp_path):
    src = tmp_path / "v1_source.safetensors"
    src.write_bytes((DATA / "v1_source.safetensors").read_bytes())
    out = tmp_path / "int4.safetensors"
    assert main([str(src), "--method", "int4", "--granularity", "group", "--group-size", "8", "--affine",
                 "--out", str(out), "--quiet"]) == 0
    old = load_file(str(DATA / "v1_int4g32.safetensors"))
    new = load_file(str(out))
    assert old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in old)


def test_a_shape_the_method_cannot_take_is_refused_before_anything_is_written(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"a": np.ones((4, 128), np.float32), "odd": np.ones((4, 1376 // 8 * 8 + 4), np.float32)}, str(src))
    out = tmp_path / "q.safetensors"
    with pytest.raises(CheckpointError, match="'odd'.*does not divide"):
        compress_checkpoint(src, out, IntQuant(QuantSpec(bits=4, granularity=PerGroup(128))), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".q.*"))


@pytest.mark.parametrize("bad", [lambda: MagnitudePrune(1.5), lambda: NMPrune(5, 4), lambda: LowRankSVD(0.5, 0.5),
                                 lambda: FloatCast("fp7"), lambda: IntQuant(calibration="guess"),
                                 lambda: FloatCast("fp16", rounding="stochastic"), lambda: Chain()])
def test_method_configs_reject_bad_values_when_built(bad):
    with pytest.raises(ValueError):
        bad()


def test_the_lowbit_package_exposes_the_same_modules():
    import compress
    import lowbit.precision.formats
    import precision
    import quant
    from lowbit.quant import QuantSpec as Q2

    assert lowbit.precision is precision and lowbit.quant is quant and lowbit.compress is compress
    assert lowbit.precision.formats is precision.formats and Q2 is QuantSpec
    assert lowbit.compress_checkpoint is compress_checkpoint and lowbit.load is load


def test_no_metrics_writes_the_same_bytes_and_says_the_error_was_not_measured(tmp_path, source):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    measured = compress_checkpoint(source, a, "int8", progress=False)
    skipped = compress_checkpoint(source, b, "int8", progress=False, metrics=False)
    assert a.read_bytes() == b.read_bytes()
    assert all(r.measured for r in measured.tensors) and not any(r.measured for r in skipped.tensors)
    assert skipped.totals["measured"] == 0 and skipped.totals["ratio"] == measured.totals["ratio"]
    assert "not measured" in skipped.to_table() and "not measured" not in measured.to_table()
    from precision.report import Report

    back = Report.from_json(skipped.to_json())
    assert not back.tensors[0].measured and back.totals["bytes_after"] == skipped.totals["bytes_after"]
    assert main([str(source), "--method", "int8", "--no-metrics", "--quiet"]) == 0


@pytest.mark.parametrize("workers, threads, want", [(1, 2, (1, 2)), (2, 2, (2, 1)), (4, 2, (2, 1)), (2, 5, (2, 2)),
                                                   (3, 1, (1, 1))])
def test_tensors_in_flight_times_threads_each_never_exceed_the_budget(workers, threads, want):
    from lowbit.checkpoint.pipeline import plan_threads

    assert plan_threads(workers, threads) == want
    assert want[0] * want[1] <= threads


def test_a_two_worker_run_on_two_cores_uses_one_thread_per_tensor(tmp_path, source, monkeypatch):
    import threading

    import torch
    from threadpoolctl import threadpool_info

    import lowbit.checkpoint.pipeline as pipeline

    seen = []

    def spy(real):
        def run(*a, **k):
            blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
            seen.append((threading.current_thread().name, torch.get_num_threads(), max(blas, default=1)))
            return real(*a, **k)
        return run

    before = torch.get_num_threads()
    for f in ("compress_tensor", "compress_row_blocks"):  # whole tensors, and tensors read by blocks of rows
        monkeypatch.setattr(pipeline, f, spy(getattr(pipeline, f)))
    rep = compress_checkpoint(source, tmp_path / "o.safetensors", "int8", workers=2, threads=2, progress=False)
    assert seen and all(t == 1 and b == 1 for _, t, b in seen)
    assert len({name for name, _, _ in seen}) <= 2  # at most two tensors in flight
    assert torch.get_num_threads() == before and "2 tensor(s) at once x 1 thread(s)" in rep.meta["threads"]


@pytest.mark.parametrize("direct_io", ["0", "1"])
def test_reading_compressing_and_writing_never_keep_more_threads_busy_than_the_budget(tmp_path, monkeypatch,
                                                                                        direct_io):
    """With --workers 2 on 2 threads, the tensors being read and compressed and the tensor being written
    through the page cache are never more than two at once, and each compression runs with one thread.
    A direct-I/O writer only queues the tensor (its own thread waits on the disk), so it takes no turn."""
    import threading

    import torch

    import lowbit.checkpoint.pipeline as pipeline

    monkeypatch.setenv("LOWBIT_DIRECT_IO", direct_io)

    src = tmp_path / "m.safetensors"
    rng = np.random.default_rng(0)
    with SafetensorsWriter(src) as w:
        for i in range(12):
            w.add(f"l{i}.weight", rng.standard_normal((256, 512)).astype(np.float32))
        w.commit()
    lock, active, peak, threads_seen = threading.Lock(), [0], [0], set()

    def busy(fn):
        def run(*a, **k):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                threads_seen.add(torch.get_num_threads())
                return fn(*a, **k)
            finally:
                with lock:
                    active[0] -= 1
        return run

    monkeypatch.setattr(pipeline, "process_tensor", busy(pipeline.process_tensor))
    real_add = SafetensorsWriter.add

    def add(self, *a, **k):  # a copy through the page cache is work on a core; queueing is not
        return real_add(self, *a, **k) if self.direct else busy(real_add)(self, *a, **k)

    monkeypatch.setattr(SafetensorsWriter, "add", add)
    compress_checkpoint(src, tmp_path / "o.safetensors", "int8", workers=2, threads=2, progress=False)
    assert peak[0] == 2 and threads_seen == {1}


@pytest.mark.parametrize("rounding, subnormals", [("nearest_away", "keep"), ("nearest_even", "flush"),
                                                  ("nearest_away", "flush")])
def test_a_float_cast_stores_what_round_to_gives_in_every_mode(tmp_path, rounding, subnormals):
    from precision import get_format, round_to

    fmt = get_format("fp8_e4m3fn")
    rng = np.random.default_rng(3)
    ties = (fmt.min_subnormal * (rng.integers(0, 2000, (64, 48)) + 0.5)).astype(np.float32)  # halfway points
    ties[::2] *= -1
    method = FloatCast("fp8_e4m3fn", scaling="none", rounding=rounding, subnormals=subnormals)
    c = compress_tensor("w", ties, Chain.of(method))
    want = round_to(ties, fmt, rounding=rounding, subnormals=subnormals)
    np.testing.assert_array_equal(c.approx.view(np.uint32), want.view(np.uint32))
    default = compress_tensor("w", ties, Chain.of(FloatCast("fp8_e4m3fn", scaling="none")))
    assert not np.array_equal(c.approx, default.approx)  # the modes change the stored codes
    src = tmp_path / "m.safetensors"
    save_file({"w": ties}, str(src))
    args = [str(src), "--method", "fp8_e4m3fn", "--scaling", "none", "--rounding", rounding, "--subnormals", subnormals,
            "--out", str(tmp_path / "o.safetensors"), "--quiet"]
    assert main(args) == 0
    np.testing.assert_array_equal(load(tmp_path / "o.safetensors", as_numpy=True)["w"].view(np.uint32),
                                  want.view(np.uint32))
