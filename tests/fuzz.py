"""python -m tests.fuzz: hostile checkpoints against lowbit's readers, with a fixed seed.

Each case is a file (or a directory of shards) made from a valid checkpoint by one mutation:
flipped and truncated bytes of real and small safetensors files, rewritten header fields
(dtypes, shapes, offsets, huge and odd JSON values, lone surrogates), lowbit files whose
schemes are rewritten (with the checksum recomputed, as an attacker can, or not), sharded
indexes with missing, linked, FIFO, traversing and duplicated shards, and pickles with
stride bombs, overlapping strides, sparse, quantized and nested tensors, zip traversal and
zip bombs. Every case is opened with ``Checkpoint`` (every tensor read) and ``load``.

A case passes when it reads or fails with ``CheckpointError`` (the documented error). Cases
run in a worker process under an address-space limit and with a time limit per case; the
summary counts cases, documented errors, foreign exceptions, hangs and the peak RSS.

    python -m tests.fuzz --cases 3000 --seed 0 [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ADDRESS_LIMIT = 6 << 30  # bytes of address space per worker, beyond what torch maps at import
CASE_SECONDS = 20


# ------------------------------------------------------------------ seeds
def _st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _small_st(rng: random.Random) -> tuple[dict, bytes]:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones(5, np.float16)
    header = {"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "F16", "shape": [5], "data_offsets": [48, 58]},
              "__metadata__": {"format": "pt"}}
    return header, a.tobytes() + b.tobytes()


def _real_st(work: Path) -> bytes | None:
    """A few tensors of the bundled MiniLM checkpoint (None where it is not installed)."""
    try:
        from bench.models import minilm_checkpoint
        from lowbit.checkpoint import Checkpoint, SafetensorsWriter
    except ImportError:
        return None
    try:
        ck = Checkpoint(minilm_checkpoint())
    except Exception:  # noqa: BLE001 - the model package is optional
        return None
    out = work / "real.safetensors"
    with SafetensorsWriter(out, force=True) as w:
        for n in [n for n in ck.names() if "layer.0." in n][:8]:
            w.add(n, ck.read(n))
        w.commit({"format": "pt"})
    return out.read_bytes()


def _lowbit_files(work: Path) -> list[Path]:
    from compress.storage import LowRankSVD, MagnitudePrune, NMPrune, StructuredPrune
    from lowbit.checkpoint import Chain, compress_checkpoint
    from precision.cast import FloatCast
    from quant import PerGroup, QuantSpec
    from quant.storage import IntQuant

    src = work / "src.safetensors"
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file

    save_file({"w": rng.standard_normal((32, 64)).astype(np.float32), "b": rng.standard_normal(32).astype(np.float32)},
              str(src))
    methods = [IntQuant(), IntQuant(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))),
               FloatCast.for_format("fp8_e4m3fn"), Chain(MagnitudePrune(0.9), IntQuant()), NMPrune(2, 4),
               StructuredPrune(0.5), LowRankSVD(rank=4)]
    out = []
    for i, m in enumerate(methods):
        p = work / f"lowbit{i}.safetensors"
        compress_checkpoint(src, p, m, progress=False, force=True)
        out.append(p)
    return out


# ------------------------------------------------------------------ mutations
ODD = [None, True, -1, 0, 1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -(10 ** 30), 1.5, float("nan"), "x", "",
       "\udc80", [], [1] * 70, [[[[]]]], {}, {"a": 1}, [2 ** 40, 2 ** 40], [0, 0], [-1], ["1"]]


def _odd(rng: random.Random) -> Any:
    v = rng.choice(ODD)
    return list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v


def _json_dumps(v: Any) -> str:
    return json.dumps(v, allow_nan=True)


def _mutate_header(rng: random.Random, header: dict) -> dict:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    kind = rng.randrange(8)
    n = rng.choice(names) if names else None
    if kind == 0 and n:
        h[n]["dtype"] = rng.choice(["F64", "I8", "BOOL", "Q7", "F8_E4M3", "BF16", 3, None])
    elif kind == 1 and n:
        h[n]["shape"] = rng.choice([[2 ** 62, 2 ** 62], [10 ** 400 // 10 ** 399], [-3], [1] * 100, [3, 4, 0], "3x4",
                                    [2 ** 31] * 4, [1e3]])
    elif kind == 2 and n:
        h[n]["data_offsets"] = rng.choice([[0, 2 ** 63], [48, 0], [-8, 40], [0], [0, 48, 96], ["0", "48"], [1, 49]])
    elif kind == 3 and n:
        h[n][rng.choice(["dtype", "shape", "data_offsets", "extra"])] = _odd(rng)
    elif kind == 4:
        h["__metadata__"] = rng.choice([{"k": 1}, [], {"lowbit": "{"}, {"lowbit": _json_dumps({"tensors": _odd(rng)})},
                                        None, {"\udc80": "v"}])
    elif kind == 5 and n:
        h["w\udc80" + n] = h.pop(n)
    elif kind == 6 and n:
        h[n + "_copy"] = dict(h[n])  # two tensors over the same bytes
    else:
        h = _odd(rng) if rng.random() < 0.5 else {"x": h}
    return h


def _flip_bytes(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    kind = rng.randrange(4)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2:
        b[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(b), len(b) - 8, 2 ** 40, 2 ** 64 - 1]))
    else:
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(b)


def _mutate_scheme(rng: random.Random, scheme: dict) -> None:
    """Replace one field anywhere in the scheme with an odd value."""
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((node, k))
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append((node, i))
                walk(v)

    walk(scheme)
    parent, key = rng.choice(paths)
    if rng.random() < 0.3 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([parent[key] * 1024, parent[key] + 1, parent[key] - 1, 2 ** 40, 0])
    else:
        parent[key] = _odd(rng)


def _lowbit_case(rng: random.Random, path: Path, d: Path) -> Path:
    from lowbit.checkpoint import Checkpoint, SafetensorsWriter
    from lowbit.checkpoint.chain import parts_digest, seal

    # lowbit's own reader and writer: safetensors' numpy API has no float8 or bfloat16 dtypes
    ck = Checkpoint(path)
    tensors = {k: ck.read(k) for k in ck.names()}
    meta = dict(ck.metadata)
    lb = json.loads(meta["lowbit"])
    name = rng.choice(sorted(lb["tensors"]))
    scheme = lb["tensors"][name]
    for _ in range(rng.randint(1, 3)):
        _mutate_scheme(rng, scheme)
    if isinstance(scheme, dict) and rng.random() < 0.7:  # recompute the checksum, as an attacker can
        parts = {k[len(name) + 2:]: v for k, v in tensors.items() if k.startswith(name + "::")}
        try:
            if scheme.get("version") == 1:
                scheme["sha256"] = parts_digest(parts)
            else:
                seal(parts, scheme)
        except (TypeError, ValueError):
            pass
    if rng.random() < 0.2:  # a part with another shape or dtype
        k = rng.choice(sorted(tensors))
        tensors[k] = rng.choice([tensors[k][:1], tensors[k].astype(np.float64), np.zeros(0, np.uint8),
                                 np.zeros((2, 3), np.int32)])
    meta["lowbit"] = _json_dumps(lb)
    out = d / "case.safetensors"
    w = SafetensorsWriter(out, force=True, inputs=[])
    for k, v in tensors.items():
        w.add(k, v)
    w.commit(meta)
    return out


def _sharded_case(rng: random.Random, d: Path, header: dict, data: bytes) -> Path:
    s1 = d / "s1.safetensors"
    s1.write_bytes(_st_bytes(header, data))
    second = {"c": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    kind = rng.randrange(8)
    s2 = d / "s2.safetensors"
    if kind == 0:
        s2.symlink_to(rng.choice(["/etc/hostname", "/proc/self/status", "/dev/zero", str(s1), "/nonexistent"]))
    elif kind == 1:
        os.mkfifo(s2)
    elif kind == 2:  # a tensor in both shards
        s2.write_bytes(_st_bytes({**second, "a": header["a"]}, np.zeros(2, np.float32).tobytes() + data[:48]))
    elif kind == 3:
        s2.write_bytes(_st_bytes({**second, "__metadata__": {"format": "tf"}}, np.zeros(2, np.float32).tobytes()))
    else:
        s2.write_bytes(_st_bytes(second, np.zeros(2, np.float32).tobytes()))
    wm: Any = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    if kind == 4:
        wm["c"] = rng.choice(["../s2.safetensors", "/etc/passwd", "", ".", "missing.safetensors", 3, None])
    elif kind == 5:
        wm = _odd(rng)
    elif kind == 6:
        del wm["b"]
    idx = d / "model.safetensors.index.json"
    body = _json_dumps({"weight_map": wm}) if kind != 7 else rng.choice(["{", "[]", '{"weight_map": 1}', "\x00" * 10])
    idx.write_text(body, errors="surrogatepass") if isinstance(body, str) else idx.write_bytes(body)
    return idx


def _pickle_case(rng: random.Random, d: Path) -> Path:
    import torch

    out = d / "case.pt"
    kind = rng.randrange(9)
    makers: list[Callable[[], Any]] = [
        lambda: {"w": torch.zeros(1).expand(1 << 14, 1 << 14)},
        lambda: {"w": torch.as_strided(torch.zeros(1 << 12), (1 << 13, 1 << 13), (1, 1))},
        lambda: {"w": torch.zeros(4, 4).to_sparse()},
        lambda: {"w": torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8)},
        lambda: {"w": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])},
        lambda: {"w": torch.zeros(2, 2, device="meta")},
        lambda: {"state_dict": {"w": torch.zeros(2)}, "extra": [1, 2]},
    ]
    if kind < len(makers):
        try:
            torch.save(makers[kind](), out)
        except Exception:  # noqa: BLE001 - a torch build that cannot save this kind: a plain case instead
            torch.save({"w": torch.zeros(2)}, out)
        return out
    buf = io.BytesIO()
    torch.save({"w": torch.arange(8.0)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if kind == 7:  # zip traversal: entries that name paths outside the archive
                z.writestr(info.filename.replace("archive/", "archive/../../"), data)
            else:  # zip bomb: the tensor's record deflated from far more bytes than declared
                big = data + bytes(64 << 20) if info.filename.endswith("data/0") else data
                z.writestr(info.filename, big, compress_type=zipfile.ZIP_DEFLATED)
    return out


# ------------------------------------------------------------------ running
def run_case(path: Path) -> str:
    from lowbit.checkpoint import Checkpoint, CheckpointError, load

    try:
        ck = Checkpoint(path)
        for n in ck.names():
            ck.info(n)
            ck.read(n)
        load(path, as_numpy=True)
        return "read"
    except CheckpointError as e:
        str(e).encode("utf-8", "backslashreplace")  # the message itself must be printable
        return "documented"


def _alarm(*_: Any) -> None:
    raise TimeoutError("case ran past its time limit")


def fuzz(cases: int, seed: int, address_limit: int = ADDRESS_LIMIT) -> dict[str, Any]:
    import torch  # noqa: F401 - mapped before the address-space limit applies

    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    header, data = _small_st(rng)
    real = _real_st(root)
    lowbit = _lowbit_files(root)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    base = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (base + address_limit, hard))
    signal.signal(signal.SIGALRM, _alarm)
    counts = {"cases": 0, "read": 0, "documented": 0, "foreign": 0, "hangs": 0}
    foreign: list[str] = []
    kinds = ["bytes", "header", "real", "lowbit", "sharded", "pickle"]
    try:
        for i in range(cases):
            d = root / f"c{i}"
            d.mkdir()
            kind = kinds[i % len(kinds)]
            try:
                if kind == "bytes":
                    path = d / "case.safetensors"
                    path.write_bytes(_flip_bytes(rng, _st_bytes(header, data)))
                elif kind == "header":
                    path = d / "case.safetensors"
                    path.write_bytes(_st_bytes(_mutate_header(rng, header), data)) if rng.random() < 0.9 else \
                        path.write_bytes(_flip_bytes(rng, _st_bytes(_mutate_header(rng, header), data)))
                elif kind == "real" and real is not None:
                    path = d / "case.safetensors"
                    path.write_bytes(_flip_bytes(rng, real))
                elif kind == "lowbit" or kind == "real":
                    path = _lowbit_case(rng, rng.choice(lowbit), d)
                elif kind == "sharded":
                    path = _sharded_case(rng, d, header, data)
                else:
                    path = _pickle_case(rng, d)
            except (ValueError, TypeError, OSError, UnicodeEncodeError, OverflowError):
                path = d / "case.safetensors"  # the mutation could not be written: a random blob instead
                path.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
            counts["cases"] += 1
            signal.alarm(CASE_SECONDS)
            try:
                counts[run_case(path)] += 1
            except TimeoutError:
                counts["hangs"] += 1
                foreign.append(f"{kind} case {i}: hang")
            except BaseException as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
                if isinstance(e, KeyboardInterrupt):
                    raise
                counts["foreign"] += 1
                tb = traceback.extract_tb(e.__traceback__)[-1]
                foreign.append(f"{kind} case {i}: {type(e).__name__}: {str(e)[:200]} at {tb.filename}:{tb.lineno}")
            finally:
                signal.alarm(0)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    counts["peak_rss_mib"] = _status_kib("VmHWM:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024
    return {"seed": seed, **counts, "address_limit_mib": address_limit >> 20, "examples": foreign[:20]}


def _status_kib(field: str, default: int) -> int:
    """A /proc/self/status field in KiB. VmHWM is this process's own peak RSS: ru_maxrss would also
    carry the peak of the process it was forked from across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return default


def _vm_size() -> int:
    return _status_kib("VmSize:", 8 << 20) * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = fuzz(a.cases, a.seed)
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0 if summary["foreign"] == 0 and summary["hangs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
