"""Smoke tests: every benchmark program runs on tiny inputs and writes its rows as data."""

from __future__ import annotations

import json

import pytest

from bench import attention, codecs, compress, e2e, ptq, scale


def rows_of(main, argv, tmp_path) -> list[dict]:
    out = tmp_path / "rows.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_codecs_benchmark_returns_and_writes_one_row_per_format_and_direction(tmp_path):
    md = tmp_path / "rows.md"
    rows = rows_of(codecs.main, ["--n", "4096", "--repeat", "1", "--formats", "fp16", "fp8_e4m3fn",
                                 "--markdown", str(md)], tmp_path)
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| format | op |") and len(lines) == 2 + len(rows)
    assert {(r["format"], r["op"]) for r in rows} >= {("fp16", "encode"), ("fp8_e4m3fn", "decode")}
    assert all(v > 0 for r in rows for k, v in r.items() if isinstance(v, float))


def test_ptq_benchmark_rows_hold_quality_and_speed_per_configuration(tmp_path):
    rows = rows_of(ptq.main, ["--only", "W8 per-channel (weight-only)", "torch.ao dynamic per-channel",
                              "--repeat", "1", "--sentences", "8"], tmp_path)
    assert [r["configuration"] for r in rows] == ["native W8 per-channel (weight-only)", "torch.ao dynamic per-channel"]
    for r in rows:
        assert 0.9 < r["cosine"] <= 1.0 + 1e-6 and r["forward_ms"] > 0 and r["forward_speedup"] > 0
        assert 0 < r["weights_mib"] < 22  # int8 weights: well under the 86 MiB float32 checkpoint's Linear share


def test_attention_benchmark_rows_hold_time_and_error_per_mask(tmp_path):
    rows = rows_of(attention.main, ["--repeat", "1", "--batch", "2"], tmp_path)
    assert len(rows) == 2 and rows[0]["mask"].startswith("none")
    assert all(r["torch_ms"] > 0 and r["lowbit_ms"] > 0 and 0 <= r["rel_error"] < 0.05 for r in rows)


def test_compress_benchmark_rows_hold_both_parts(tmp_path):
    rows = rows_of(compress.main, ["--only", "magnitude 50%", "per layer", "--sentences", "4", "--plot", "",
                                   "--size", "128", "--rank", "8", "--repeat", "1"], tmp_path)
    quality = {r["method"]: r for r in rows if r["part"] == "quality"}
    assert set(quality) == {"magnitude 50%", "global magnitude 50%", "torch.nn.utils.prune 50% (per layer)"}
    assert quality["magnitude 50%"]["kept"] < 0.6 < 1.0 < quality["torch.nn.utils.prune 50% (per layer)"]["kept"]
    speed = [r for r in rows if r["part"] == "speed"]
    assert len(speed) == 3 and speed[0]["identical"] and speed[1]["identical"]
    assert speed[2]["rel_error"] >= speed[2]["optimal_rel_error"] - 1e-9  # Eckart-Young: exact SVD is optimal


def test_e2e_benchmark_rows_hold_each_program(tmp_path):
    rows = rows_of(e2e.main, ["--repeat", "1", "--size", "0.02", "--tensor-mib", "2", "--workers", "1", "2",
                              "--methods", "int8 per channel", "magnitude 50%", "--dir", str(tmp_path)], tmp_path)
    minilm = [r for r in rows if r["part"] == "minilm"]
    lowbit, ao = (next(r for r in minilm if r["program"].startswith(p)) for p in ("lowbit bench.quantize", "torch.ao"))
    assert 0 < lowbit["output_mib"] < ao["output_mib"]
    assert all(r["wall_s"] > 0 for r in minilm)
    speed = [r for r in rows if r["part"] == "throughput"]
    assert {(r["cache"], r["method"], r["workers"]) for r in speed} == {
        (c, m, w) for c in ("warm", "cold") for m in ("int8 per channel", "magnitude 50%") for w in (1, 2)}
    assert all(r["gbps"] > 0 and r["read_gbps"] > 0 for r in speed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # the checkpoint is removed


def test_scale_benchmark_stays_within_its_memory_bound(tmp_path):
    rows = rows_of(scale.main, ["--sizes", "0.01", "--tensor-mib", "1", "--dir", str(tmp_path)], tmp_path)
    assert len(rows) == 1 and rows[0]["within_bound"] == "yes" and rows[0]["gbps"] > 0


def test_scale_benchmark_runs_ray_against_the_plain_cli(tmp_path):
    pytest.importorskip("ray", reason="needs lowbit[ray]")
    rows = rows_of(scale.main, ["--sizes", "0.01", "--tensor-mib", "1", "--dir", str(tmp_path), "--workers", "2",
                                "--executors", "local", "ray"], tmp_path)
    local, ray = rows
    assert (local["executor"], ray["executor"]) == ("local", "ray") and ray["workers"] == 2
    assert ray["overhead_ms_per_tensor"] is not None and ray["cpu_s"] > 0 and ray["peak_rss_mib"] > local["peak_rss_mib"]


@pytest.mark.parametrize("main, argv", [(ptq.main, ["--sentences", "1"]), (compress.main, ["--rank", "0"]),
                                        (scale.main, ["--sizes", "0"])])
def test_benchmarks_refuse_bad_options(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_blocks_benchmark_rows_hold_speed_and_agreement_with_torchao(tmp_path):
    pytest.importorskip("torchao", reason="the MX reference is torchao's")
    from bench import blocks

    rows = rows_of(blocks.main, ["--rows", "64", "--cols", "256", "--repeat", "1", "--formats", "mxfp4",
                                 "mxfp8_e4m3", "nvfp4", "--parts", "speed"], tmp_path)
    assert [r["format"] for r in rows] == ["mxfp4", "mxfp8_e4m3", "nvfp4"]
    assert all(r["scales_identical"] == "yes" and r["lowbit_gels"] > 0 and r["torchao_gels"] > 0 for r in rows)
    assert rows[0]["elements_differ"] == rows[1]["elements_differ"] == 0


def test_blocks_accuracy_rows_give_bits_per_weight_and_cosine_on_minilm(tmp_path, monkeypatch):
    from bench import blocks

    monkeypatch.setattr(blocks, "ACCURACY", {"int8 per channel": "int8", "NVFP4": "nvfp4", "Q4_0": "q4_0"})
    rows = rows_of(blocks.main, ["--parts", "accuracy"], tmp_path)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"int8 per channel", "NVFP4", "Q4_0"} and all(r["part"] == "accuracy" for r in rows)
    assert by["NVFP4"]["bits_per_weight"] == pytest.approx(4.5, abs=1e-3)  # + 4 bytes per tensor
    assert by["Q4_0"]["bits_per_weight"] == 4.5
    assert 8 < by["int8 per channel"]["bits_per_weight"] < 8.1
    assert by["int8 per channel"]["mean_cosine"] > 0.999 > by["NVFP4"]["mean_cosine"] > 0.9


def test_deploy_child_measures_each_loader_against_the_dense_reference(tmp_path, tiny_bert):
    """bench.deploy's per-process measurement on a tiny BERT: the dense run writes the reference output,
    the loaders of its compressed-tensors directory measure against it; lowbit keeps the int8 codes."""
    from bench import deploy
    from lowbit import CompressedTensors, compress_checkpoint

    tiny_bert.save_pretrained(str(tmp_path / "bert"))
    compress_checkpoint(tmp_path / "bert", tmp_path / "ct", "int8", format=CompressedTensors(activations="int8"),
                        progress=False)
    ref = tmp_path / "ref.pt"
    dense = deploy.child("dense", str(tmp_path / "bert"), str(ref), 1, "float32", tokens=32)
    assert dense["cosine"] == 1.0 and ref.is_file()
    ours = deploy.child("lowbit", str(tmp_path / "ct"), str(ref), 1, None, tokens=32)
    theirs = deploy.child("transformers", str(tmp_path / "ct"), str(ref), 1, None, tokens=32)
    assert 0.99 < ours["cosine"] <= 1 and 0.99 < theirs["cosine"] <= 1
    assert ours["state_mib_run"] < theirs["state_mib_run"] == pytest.approx(dense["state_mib_run"], rel=0.01)
    assert all(v > 0 for v in (ours["latency_ms"], ours["peak_rss_mib_run"], ours["load_s"]))


def test_markdown_keeps_cosines_distance_to_one_visible():
    from bench.timing import markdown

    table = markdown([{"cosine": 0.99897}, {"cosine": 0.999961}, {"cosine": 0.95}, {"cosine": 1.0}])
    assert "| 0.99897 |" in table and "| 0.999961 |" in table and "| 0.95 |" in table and "| 1 |" in table


def test_conformance_table_lists_ml_dtypes_and_torch_with_their_versions(tmp_path):
    import importlib.metadata
    import json

    from bench.conformance import main as conformance

    assert conformance(["--sample", "500", "--json", str(tmp_path / "c.json")]) == 0
    rows = json.loads((tmp_path / "c.json").read_text())
    libs = {r["library"]: r["version"] for r in rows}
    assert libs["ml_dtypes"] == importlib.metadata.version("ml_dtypes") and libs["torch"] == importlib.metadata.version("torch")
    assert all(r["inputs"] > 0 for r in rows)
    control = [r for r in rows if r["library"] == "lowbit"]
    assert control and all(r["disagree"] == 0 for r in control)  # lowbit's own round_to agrees everywhere
    # torch rounds float64 through float32: the table shows it (whatever the installed version does, it is counted)
    assert any(r["library"] == "torch" and r["input"] == "float64" for r in rows)


def test_llm_benchmark_rows_measure_perplexity_kl_and_memory_on_a_causal_lm(tmp_path):
    import json

    from bench.llm import main as llm
    from tests.lowbit.test_causal_lm import causal_lm_dir

    d = causal_lm_dir(tmp_path, "llama")
    text = tmp_path / "heldout.txt"
    text.write_text("The harbour lights were reflected in the water of the bay. " * 30, encoding="utf-8")
    assert llm(["--model", str(d), "--rows", "W8 per-channel RTN", "W4 g64 sym GPTQ", "--seqlen", "32", "--samples",
                "4", "--eval-data", str(text), "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in rows] == ["W8 per-channel RTN", "W4 g64 sym GPTQ"]
    for r in rows:
        assert r["perplexity"] > 0 and r["float_perplexity"] > 0 and r["kl"] >= 0 and 0 <= r["top1"] <= 1
        assert 0 < r["stored_mib"] < r["float_mib"] and r["peak_rss_mib"] > 0
    assert rows[0]["calibration_tokens"] is None and rows[1]["calibration_tokens"] == 4 * 32
