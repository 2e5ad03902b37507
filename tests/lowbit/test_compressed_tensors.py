"""compressed-tensors output and input, checked with the real readers: compressed-tensors' own
decompression, transformers' from_pretrained, and lowbit's quantized modules built from the directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

import lowbit  # noqa: E402
from lowbit.checkpoint import CheckpointError, CompressedTensors, compress_checkpoint, load, load_quantized, save_quantized  # noqa: E402
from lowbit.checkpoint.compressed_tensors import pack_int32, unpack_int32  # noqa: E402
from precision.blocks import BlockCast  # noqa: E402
from precision.cast import FloatCast  # noqa: E402
from quant import PTQConfig, PerChannel, PerGroup, PerTensor, QuantSpec, ptq  # noqa: E402
from quant.modules import TOKEN_SPEC_AFFINE, TOKEN_SPEC_FULL, Float8Linear, QuantizedLinear  # noqa: E402
from quant.storage import IntQuant  # noqa: E402


def _int(bits: int, gran: Any, symmetric: bool = True, signed: bool = True) -> IntQuant:
    return IntQuant(QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=gran))


METHODS: dict[str, tuple[Any, CompressedTensors]] = {
    "int8-channel": (_int(8, PerChannel(0)), CompressedTensors()),
    "int8-tensor": (_int(8, PerTensor()), CompressedTensors()),
    "int8-group32-affine": (_int(8, PerGroup(32), symmetric=False), CompressedTensors()),
    "uint8-channel-affine": (_int(8, PerChannel(0), symmetric=False, signed=False), CompressedTensors()),
    "w8a8": (_int(8, PerChannel(0)), CompressedTensors(activations="int8")),
    "w8a8-affine": (_int(8, PerChannel(0)), CompressedTensors(activations="int8_affine")),
    "int4-group32": (_int(4, PerGroup(32)), CompressedTensors()),
    "int4-group32-affine": (_int(4, PerGroup(32), symmetric=False), CompressedTensors()),
    "int4-channel": (_int(4, PerChannel(0)), CompressedTensors()),
    "int4-channel-affine": (_int(4, PerChannel(0), symmetric=False), CompressedTensors()),
    "int3-group32-affine": (_int(3, PerGroup(32), symmetric=False), CompressedTensors()),
    "fp8-channel": (FloatCast.for_format("fp8_e4m3fn"), CompressedTensors()),
    "fp8-tensor": (FloatCast("fp8_e4m3fn", scaling="tensor"), CompressedTensors()),
}
# transformers 5.x cannot load an affine pack-quantized checkpoint: its zero point is packed in the file
# but transformers allocates it unpacked (a size mismatch; the same for ModelCompressor's own output)
TRANSFORMERS_REFUSES = {"int4-group32-affine", "int4-channel-affine", "int3-group32-affine"}


def _save(model: Any, d: Path) -> Path:
    model.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init float32 BERT and Llama model directories built from configs."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ct_models")
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=512, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        max_position_embeddings=64)).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for m in (bert, llama):
            for p in m.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape) * 0.05)
    return {"bert": _save(bert, root / "bert"), "llama": _save(llama, root / "llama")}


def _ids(vocab: int) -> Any:
    return torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def _ct_decompressed(d: Path) -> dict[str, np.ndarray]:
    """Every quantized layer's weight as compressed-tensors' own compressor decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(cfg)
    sd = load_file(str(d / "model.safetensors"))
    out = {}
    for scheme in qc.config_groups.values():
        comp = BaseCompressor.get_value_from_registry(scheme.format)
        for target in scheme.targets:
            module = target[len("re:^(?:.*\\.)?"):-1].replace("\\", "")
            local = {k[len(module) + 1:]: v for k, v in sd.items() if k.startswith(module + ".")}
            out[module + ".weight"] = comp.decompress(local, scheme)["weight"].float().numpy()
    return out


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_readers_get_lowbits_weights_bit_for_bit(method: str, arch: str, model_dirs: dict[str, Path],
                                                  tmp_path: Path) -> None:
    src = model_dirs[arch]
    chain, fmt = METHODS[method]
    out = tmp_path / "ct"
    rep = compress_checkpoint(src, out, chain, format=fmt, progress=False)
    compress_checkpoint(src / "model.safetensors", tmp_path / "lowbit.safetensors", chain, progress=False)
    ours = load(tmp_path / "lowbit.safetensors", as_numpy=True)  # lowbit's own format, same method
    # every Linear layer of the encoder (its pooler included); the causal LM's blocks, its lm_head kept by default
    assert len(rep.tensors) == (13 if arch == "bert" else 14)
    if arch == "llama":
        assert "outside the repeated blocks" in {k.name: k.reason for k in rep.kept}["lm_head.weight"]

    theirs = _ct_decompressed(out)
    assert set(theirs) == {r.name for r in rep.tensors}
    for k, v in theirs.items():
        assert v.dtype == np.float32 and np.array_equal(v.view(np.uint32), ours[k].view(np.uint32)), k
    dense = load(out, as_numpy=True)  # lowbit reads the directory back the same; the rest is the source's
    source = load(src / "model.safetensors", as_numpy=True)
    assert set(dense) == set(source)
    for k in source:
        assert np.array_equal(dense[k], ours[k] if k in theirs else source[k]), k

    q = load_quantized(out)
    quantized = [m for m in q.modules() if isinstance(m, (QuantizedLinear, Float8Linear))]
    assert len(quantized) == len(rep.tensors)
    if method.startswith(("int8", "w8a8")):
        assert all(m.weight_codes.dtype == torch.int8 for m in quantized)
    if fmt.activations:  # the declared input scheme is the one the int8 kernel runs
        want = TOKEN_SPEC_AFFINE if fmt.activations == "int8_affine" else TOKEN_SPEC_FULL
        assert all(m.int_kernel and m.act_spec == want for m in quantized)
    ids = _ids(q.config.vocab_size)
    if method in TRANSFORMERS_REFUSES:
        with pytest.raises(RuntimeError, match="mismatch"):
            type(q).from_pretrained(str(out), dtype=torch.float32)
        return
    ref = type(q).from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ref(input_ids=ids)[0], q(input_ids=ids)[0]
    sd = ref.state_dict()
    for k in theirs:
        key = k if k in sd else next(s for s in sd if s.endswith("." + k))
        assert np.array_equal(sd[key].numpy().view(np.uint32), ours[k].view(np.uint32)), k
    if fmt.activations:  # both quantize the inputs per token on the fly; transformers in float, lowbit in int8
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.9999
    else:
        assert torch.equal(a, b)


def test_pack_int32_matches_compressed_tensors_packing() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        for cols in (1, 7, 32, 45, 96):
            codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (3, cols)).astype(np.int8)
            ours = pack_int32(codes, bits)
            ref = pack_to_int32(torch.from_numpy(codes), bits).numpy()
            assert np.array_equal(ours, ref), (bits, cols)
            assert np.array_equal(unpack_int32(ours, bits, cols), codes)
            back = unpack_from_int32(torch.from_numpy(ours), bits, torch.Size(codes.shape)).numpy()
            assert np.array_equal(back, codes)


@pytest.mark.parametrize("method,match", [
    ("prune,int8", "pruning|sparse"), ("svd,int8", "sparse"), ("fp16", "fp16"), ("fp8_e5m2", "e4m3fn"),
])
def test_methods_it_cannot_carry_are_refused_with_the_formats_that_can(method: str, match: str,
                                                                        model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="formats that carry it: lowbit"):
        compress_checkpoint(model_dirs["bert"], tmp_path / "o", method, format="compressed-tensors", progress=False)
    assert not (tmp_path / "o").exists()


def test_block_formats_it_lacks_and_w8a8_misuse_are_refused(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    for f in ("mxint8", "mxfp8_e5m2", "mxfp6_e3m2", "q8_0"):
        with pytest.raises(ValueError, match="formats that carry it"):
            compress_checkpoint(model_dirs["bert"], tmp_path / "o", BlockCast(f), format="compressed-tensors")
    with pytest.raises(ValueError, match="W8A8"):
        compress_checkpoint(model_dirs["bert"], tmp_path / "o", _int(4, PerGroup(32)),
                            format=CompressedTensors(activations="int8"))
    with pytest.raises(ValueError, match="activations"):
        CompressedTensors(activations="fp8")
    assert not (tmp_path / "o").exists()


def test_output_directory_is_complete_and_never_replaced_without_force(model_dirs: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    src = model_dirs["bert"]
    (src / "vocab.txt").write_text("[PAD]\n")
    (src / "sub").mkdir(exist_ok=True)
    (src / "sub" / "x.json").write_text("{}")
    out = tmp_path / "ct"
    compress_checkpoint(src, out, "int8", format="compressed-tensors", progress=False)
    assert (out / "vocab.txt").read_text() == "[PAD]\n" and (out / "sub" / "x.json").is_file()
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["model_type"] == "bert"
    with pytest.raises(CheckpointError, match="already exists"):
        compress_checkpoint(src, out, "int4", format="compressed-tensors", progress=False)
    compress_checkpoint(src, out, "int4", format="compressed-tensors", progress=False, force=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(CheckpointError, match="inside the input"):
        compress_checkpoint(src, src / "out", "int8", format="compressed-tensors", progress=False)


@pytest.mark.parametrize("config", ["w8", "w8a8", "w8a8-affine", "w4"])
def test_save_quantized_round_trip_gives_identical_outputs(config: str, model_dirs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    model = transformers.BertModel.from_pretrained(str(model_dirs["bert"])).eval()
    cfg = {"w8": PTQConfig.W8,
           "w8a8": PTQConfig(activations=TOKEN_SPEC_FULL, activation_mode="dynamic"),
           "w8a8-affine": PTQConfig(activations=TOKEN_SPEC_AFFINE, activation_mode="dynamic"),
           "w4": PTQConfig(weights=QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)))}[config]
    q, _ = ptq(model, cfg)
    d = save_quantized(q, tmp_path / "saved")
    back = load_quantized(d)
    ids = _ids(512)
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).last_hidden_state, back(input_ids=ids).last_hidden_state)
    for (n, a), (_, b) in zip(sorted((n, m) for n, m in q.named_modules() if isinstance(m, QuantizedLinear)),
                              sorted((n, m) for n, m in back.named_modules() if isinstance(m, QuantizedLinear))):
        assert torch.equal(a.codes(), b.codes()) and torch.equal(a.weight_scale, b.weight_scale), n
    if config != "w4":  # transformers reads it too (see TRANSFORMERS_REFUSES for affine packed)
        ref = transformers.BertModel.from_pretrained(str(d), dtype=torch.float32).eval()
        with torch.no_grad():
            y = ref(input_ids=ids).last_hidden_state
        assert torch.nn.functional.cosine_similarity(y.flatten(), back(input_ids=ids).last_hidden_state.flatten(), 0) > 0.9999


def test_save_quantized_refuses_what_compressed_tensors_cannot_express(model_dirs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    model = transformers.BertModel.from_pretrained(str(model_dirs["bert"])).eval()
    q, _ = ptq(model, PTQConfig.W8A8_DYNAMIC)  # narrow-range token activations
    with pytest.raises(ValueError, match="TOKEN_SPEC_FULL"):
        save_quantized(q, tmp_path / "a")
    with pytest.raises(ValueError, match="no lowbit quantized layers"):
        save_quantized(model, tmp_path / "b")
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=32, vocab_size=128))
    with pytest.raises(ValueError, match="Conv1D"):
        save_quantized(ptq(gpt2.eval(), PTQConfig.W8)[0], tmp_path / "c")
    assert not any(tmp_path.iterdir())
    bad = QuantSpec(bits=8, symmetric=False, signed=False, granularity=PerChannel(0))  # uint8 tokens: not CT's
    with pytest.raises(ValueError, match="TOKEN_SPEC_AFFINE"):
        save_quantized(ptq(model, PTQConfig(activations=bad, activation_mode="dynamic"))[0], tmp_path / "d")


def test_load_quantized_reads_what_model_compressor_wrote(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint quantized and written by compressed-tensors itself (its own rounding, x / s)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    for name, wargs, acts in [
        ("w4g32", QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32), None),
        ("w8a8", QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
         QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)),
        ("w8a8-affine", QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
         QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="token", dynamic=True)),
    ]:
        m = transformers.LlamaForCausalLM.from_pretrained(str(model_dirs["llama"])).eval()
        apply_quantization_config(m, QuantizationConfig(config_groups={"g": QuantizationScheme(
            targets=["Linear"], weights=wargs, input_activations=acts)}, ignore=["lm_head"]))
        for mod in m.modules():
            if getattr(mod, "quantization_scheme", None) is not None:
                w = mod.weight.data
                if wargs.strategy == "group":
                    w = w.reshape(w.shape[0], -1, 32)
                s, _ = calculate_qparams(w.amin(-1), w.amax(-1), wargs)
                mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
        comp = ModelCompressor.from_pretrained_model(m)
        comp.compress_model(m)
        d = tmp_path / name
        m.save_pretrained(str(d))
        comp.update_config(str(d))
        q = load_quantized(d)
        layers = [x for x in q.modules() if isinstance(x, QuantizedLinear)]
        assert len(layers) == 14 and all(x.int_kernel == (acts is not None) for x in layers)
        assert acts is None or all(x.act_spec.symmetric == acts.symmetric for x in layers)
        assert not isinstance(q.lm_head, QuantizedLinear)  # ignored by the config
        ref = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        ids = _ids(256)
        with torch.no_grad():
            a, b = ref(input_ids=ids).logits, q(input_ids=ids).logits
        if acts is None:
            assert torch.equal(a, b)
        else:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.9999


def test_schemes_lowbit_cannot_run_are_named(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ct"
    compress_checkpoint(model_dirs["bert"], out, "int8", format="compressed-tensors", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="input activations float 8-bit tensor"):
        load_quantized(out)


def test_lowbit_top_level_exports() -> None:
    assert lowbit.load_quantized is load_quantized and lowbit.save_quantized is save_quantized
    assert lowbit.CompressedTensors is CompressedTensors


def test_cli_w8a8_round_trip_gives_ptqs_embeddings_on_minilm(tmp_path: Path, minilm_model: Any) -> None:
    """bench.quantize --method w8a8 --format compressed-tensors, then load_quantized, then encode: the same
    codes and the same embeddings as ptq with the same scheme on the float model."""
    from transformers import AutoTokenizer

    from bench.models import embed, mean_pooled, minilm_dir, sentences
    from bench.quantize import main

    out = tmp_path / "w8a8"
    assert main(["--method", "w8a8", "--format", "compressed-tensors", "--out", str(out), "--quiet"]) == 0
    loaded = load_quantized(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    texts = sentences()[:48]
    q, _ = ptq(minilm_model[0].auto_model, PTQConfig(activations=TOKEN_SPEC_FULL, activation_mode="dynamic"))
    a = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    b = {n: m for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert a.keys() == b.keys() and len(a) == 37 and all(m.int_kernel for m in a.values())
    for n in a:
        assert torch.equal(a[n].codes(), b[n].codes()) and torch.equal(a[n].weight_scale, b[n].weight_scale), n
    ours, theirs = mean_pooled(loaded, tok, texts), mean_pooled(q, tok, texts)
    assert torch.equal(ours, theirs)
    ref = embed(minilm_model, texts)  # the float sentence-transformers pipeline
    assert torch.nn.functional.cosine_similarity(ref, mean_pooled(minilm_model[0].auto_model, tok, texts)).min() > 0.99999
    assert torch.nn.functional.cosine_similarity(ref, ours).mean() > 0.995  # W8A8 without SmoothQuant
    assert Path(minilm_dir()).is_dir()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "nvfp4"])
def test_block_formats_carry_lowbits_codes_and_scales(fmt: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """MX and NVFP4 as compressed-tensors' mxfp4/mxfp6/mxfp8/nvfp4 formats: the MX weights decompress to
    lowbit's bit for bit; NVFP4's codes and block scales are lowbit's, its values within bfloat16 rounding
    (compressed-tensors computes element * (scale / global_scale) in bfloat16). transformers loads a
    bfloat16 model (a float32 one fails on its first forward: the weights stay bfloat16) with the same weights,
    and load_quantized runs them with the codes kept."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from safetensors.torch import load_file

    src = model_dirs["llama"]
    out = tmp_path / "ct"
    compress_checkpoint(src, out, BlockCast(fmt), format="compressed-tensors", progress=False)
    compress_checkpoint(src / "model.safetensors", tmp_path / "lowbit.safetensors", BlockCast(fmt), progress=False)
    ours = load(tmp_path / "lowbit.safetensors", as_numpy=True)
    theirs = _ct_decompressed(out)
    assert len(theirs) == 14  # the blocks' Linear layers; lm_head kept by default
    for k, v in theirs.items():
        if fmt == "nvfp4":
            assert np.all(np.abs(v - ours[k]) <= np.abs(ours[k]) * 2.0 ** -8 + 1e-30), k
        else:
            assert np.array_equal(v, ours[k]), k
    if fmt == "nvfp4":  # the stored codes themselves: element values and block scales equal lowbit's
        from precision.blocks import block_encode

        sd = load_file(str(out / "model.safetensors"))
        w = load(src / "model.safetensors", as_numpy=True)["model.layers.0.mlp.down_proj.weight"]
        b = block_encode(w, "nvfp4")
        packed = sd["model.layers.0.mlp.down_proj.weight_packed"]
        elems = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32).numpy()
        from precision.codec import decode

        assert np.array_equal(elems, np.asarray(decode(b.codes, "fp4_e2m1fn")).reshape(elems.shape))
        assert np.array_equal(sd["model.layers.0.mlp.down_proj.weight_scale"].view(torch.uint8).numpy().reshape(-1),
                              b.scales.reshape(-1))
        assert sd["model.layers.0.mlp.down_proj.weight_global_scale"].item() == np.float32(1.0 / b.tensor_scale)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref(input_ids=_ids(256))
    sd = ref.state_dict()
    for k, v in theirs.items():
        assert np.array_equal(sd[k].float().numpy(), v), k
    q = load_quantized(out)  # the codes kept, dequantized per call
    from quant.modules import BlockLinear

    layers = {n: m for n, m in q.named_modules() if isinstance(m, BlockLinear)}
    assert len(layers) == 14
    dense = load(out, as_numpy=True)
    for n, m in layers.items():
        w = m.dequantized_weight().numpy()
        assert np.array_equal(w, dense[n + ".weight"]), n
        if fmt != "nvfp4":  # MX: lowbit's own values; NVFP4: scale / global_scale in float32, within an ulp
            assert np.array_equal(w, ours[n + ".weight"]), n
        else:
            assert np.allclose(w, ours[n + ".weight"], rtol=2e-7, atol=0), n
    reference = transformers.LlamaForCausalLM.from_pretrained(str(src)).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in dense.items()}, strict=False)
    with torch.no_grad():
        assert torch.equal(q(input_ids=_ids(256)).logits, reference(input_ids=_ids(256)).logits)


@pytest.mark.parametrize("spec", [QuantSpec(granularity=PerChannel(0)), QuantSpec(bits=4, granularity=PerGroup(32))])
def test_bfloat16_model_with_bfloat16_scales_loads_bit_for_bit_in_transformers(spec: QuantSpec, model_dirs: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """transformers holds a bfloat16 model's scales in bfloat16: IntQuant(scale_dtype="bfloat16") makes the codes
    with scales it holds exactly, so its weights equal lowbit's load and compressed-tensors' decompression."""
    from safetensors import safe_open

    src = tmp_path / "llama16"
    transformers.LlamaForCausalLM.from_pretrained(str(model_dirs["llama"])).to(torch.bfloat16).save_pretrained(str(src))
    method = IntQuant(spec, scale_dtype="bfloat16")
    compress_checkpoint(src, tmp_path / "ct", method, format="compressed-tensors", progress=False)
    compress_checkpoint(src / "model.safetensors", tmp_path / "q.safetensors", method, progress=False)
    ours = load(tmp_path / "q.safetensors", as_numpy=True)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.bfloat16
    theirs = _ct_decompressed(tmp_path / "ct")
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref(input_ids=_ids(256))
    sd = ref.state_dict()
    for k in theirs:
        want = ours[k].astype(np.float32)
        assert np.array_equal(theirs[k], want), k
        assert np.array_equal(sd[k].float().numpy(), want), k


def test_cli_picks_the_checkpoints_dtype_for_scales_and_refuses_it_for_affine(model_dirs: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    from safetensors import safe_open

    from bench.quantize import main

    src = tmp_path / "llama16"
    transformers.LlamaForCausalLM.from_pretrained(str(model_dirs["llama"])).to(torch.float16).save_pretrained(str(src))
    assert main([str(src), "--method", "w8a8", "--format", "compressed-tensors", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.float16
    assert main([str(src), "--method", "int8", "--scale-dtype", "bfloat16", "--affine", "--quiet"]) == 2


def _damaged(model_dirs: dict[str, Path], tmp_path: Path, damage: Any) -> Path:
    """The tiny BERT as an int8 compressed-tensors directory whose config.json ``damage`` edits."""
    out = tmp_path / "ct"
    compress_checkpoint(model_dirs["bert"], out, "int8", format="compressed-tensors", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    damage(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("damage,match", [
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(targets=["re:(unclosed"]), "regular expression"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(targets="Linear"), "list of strings"),
    (lambda c: c["quantization_config"].update(config_groups={}), "no config_groups"),
    (lambda c: c["quantization_config"].update(quantization_status="frozen"), "only compressed"),
])
def test_a_damaged_quantization_config_is_a_checkpoint_error(damage: Any, match: str, model_dirs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    out = _damaged(model_dirs, tmp_path, damage)
    for read in (load_quantized, load):
        with pytest.raises(CheckpointError, match=match):
            read(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a transformers config|cannot be read"):
        load_quantized(out)


def test_cli_affine_w8a8_with_gptq_keeps_minilm_sentence_embeddings_within_0_999(tmp_path: Path,
                                                                                  minilm_model: Any) -> None:
    """The accuracy claim of the README's deploy table: asymmetric per-token inputs plus GPTQ weights,
    written as compressed-tensors and run by load_quantized on the int8 kernels, keep the mean
    sentence-embedding cosine to float32 at or above 0.999 on the sentences not used for calibration
    (symmetric inputs do not: the control)."""
    from transformers import AutoTokenizer

    from bench.models import mean_pooled, sentences
    from bench.quantize import main

    held_out = sentences()[1::2]  # the calibration default is the even lines
    cos = {}
    for name, extra in (("affine", ["--affine-activations"]), ("symmetric", [])):
        out = tmp_path / name
        assert main(["--method", "w8a8", *extra, "--gptq", "--format", "compressed-tensors", "--out", str(out),
                     "--quiet", "--no-metrics"]) == 0
        q = load_quantized(out)
        tok = AutoTokenizer.from_pretrained(str(out))  # copied from the source directory
        assert all(m.int_kernel for m in q.modules() if isinstance(m, QuantizedLinear))
        ref = mean_pooled(minilm_model[0].auto_model, tok, held_out)
        cos[name] = float(torch.nn.functional.cosine_similarity(ref, mean_pooled(q, tok, held_out)).mean())
    assert cos["affine"] >= 0.999 > cos["symmetric"], cos


def test_cli_refuses_affine_activations_without_w8a8(tmp_path: Path) -> None:
    from bench.quantize import main

    assert main(["--method", "int8", "--affine-activations", "--format", "compressed-tensors",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


def _group0(c: dict) -> dict:
    return c["quantization_config"]["config_groups"]["group_0"]


@pytest.mark.parametrize("damage,match", [
    (lambda c: c["quantization_config"].update(sparsity_config="x"), "sparsity_config"),
    (lambda c: _group0(c).update(input_activations="int8"), "input_activations"),
    (lambda c: _group0(c).update(weights="int8"), "weights"),
    (lambda c: _group0(c).update(targets=["re:^nothing_matches$"]), "no config group targets"),
    (lambda c: c.update(max_position_embeddings=150_000_000), "150000000|position"),
    (lambda c: c.update(num_hidden_layers=100_000), "num_hidden_layers"),
    (lambda c: c.update(intermediate_size=96), r"intermediate|\[96|96\]"),
    (lambda c: c.update(architectures=["pipeline"]), "not a transformers model class"),
    (lambda c: c.update(architectures=["os.system"]), "not a class name"),
], ids=["sparsity", "input_acts", "weights", "targets", "max_pos", "layers", "linear_shape", "callable", "dotted"])
def test_a_hostile_config_is_one_checkpoint_error_before_any_large_allocation(damage: Any, match: str,
                                                                             model_dirs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    out = _damaged(model_dirs, tmp_path, damage)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(out)


@pytest.mark.parametrize("tensor,change", [
    ("encoder.layer.0.attention.self.query.weight", lambda a: a[:-1]),
    ("encoder.layer.0.intermediate.dense.weight", lambda a: np.ascontiguousarray(a.T)),
    ("encoder.layer.0.attention.self.query.weight_scale", lambda a: a[:-1]),
    ("encoder.layer.0.attention.self.query.bias", lambda a: a[:-2]),
    ("embeddings.word_embeddings.weight", lambda a: a[:, :-1]),
    ("encoder.layer.0.intermediate.dense.weight_shape", lambda a: np.array([np.iinfo(np.int64).max, 64], np.int64)),
], ids=["short_rows", "transposed", "short_scale", "short_bias", "kept_shape", "absurd_weight_shape"])
def test_stored_tensors_that_do_not_fit_the_models_layers_are_refused_at_load(tensor: str, change: Any,
                                                                           model_dirs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "ct"
    src = model_dirs["bert"]
    method = IntQuant(QuantSpec(bits=4, granularity=PerChannel(0))) if "weight_shape" in tensor else "int8"
    compress_checkpoint(src, out, method, format="compressed-tensors", progress=False)
    st = load_file(str(out / "model.safetensors"))
    assert tensor in st
    st[tensor] = change(st[tensor])
    save_file(st, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        load_quantized(out)


@pytest.mark.parametrize("key,value", [("max_position_embeddings", 150_000_000), ("max_position_embeddings", 10**13),
                                       ("vocab_size", 10**12), ("num_hidden_layers", 100_000)])
def test_load_quantized_never_allocates_what_the_files_do_not_hold(key: str, value: int, model_dirs: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """The README's promise, on load_quantized: a config.json that declares huge sizes is refused in a
    process whose peak memory stays that of importing torch and transformers."""
    import subprocess
    import sys

    out = _damaged(model_dirs, tmp_path, lambda c: c.update({key: value}))
    # VmHWM: this process image's peak (ru_maxrss would carry the forking test process's peak over exec)
    code = ("from lowbit.checkpoint import CheckpointError, load_quantized\n"
            f"try:\n    load_quantized({str(out)!r})\nexcept CheckpointError as e:\n    print('refused:', e)\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
            "print('peak_kib', hwm)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "refused:" in r.stdout, r.stdout + r.stderr[-2000:]
    peak_mib = int(r.stdout.split("peak_kib")[1]) / 1024
    assert peak_mib < 1000, peak_mib
