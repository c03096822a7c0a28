"""Fuzzing the checkpoint reader: mutated config.json and safetensors files give OptqError (or load), never
another exception, a hang or a huge allocation. `make test` runs FUZZ_CASES cases (seeded); set
OPTQ_FUZZ_CASES=5000 for a longer run (docs/validation.md)."""

import json
import os
import random
import shutil
import signal
import struct

import pytest

import optq
from optq.config import QuantizeConfig
from optq.errors import OptqError

FUZZ_CASES = int(os.environ.get("OPTQ_FUZZ_CASES", "80"))
JUNK = [None, -1, 0, 1, 3, 5, 7.5, 10**6, -(10**6), "", "x", "gptq", [], [1, 2], {}, {"a": 1}, True, False]


@pytest.fixture(scope="module")
def base_checkpoint(tinystories_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "base"
    optq.quantize(tinystories_model, out, QuantizeConfig(bits=4, group_size=32, method="rtn"), progress=False)
    return out


def _mutate_config(folder, rng):
    path = folder / "config.json"
    text = path.read_text()
    kind = rng.randrange(4)
    if kind == 0:  # garbled text
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["", "}", "{", "\x00", "\"", "]]"]) + text[i + rng.randrange(0, 5):]
        path.write_text(text)
        return "config text"
    cfg = json.loads(text)
    target = cfg["quantization_config"] if kind in (1, 2) else cfg
    key = rng.choice(sorted(target))
    if kind == 2 and rng.random() < 0.3:
        del target[key]
        what = f"del quantization_config.{key}"
    else:
        target[key] = rng.choice(JUNK)
        what = f"{'quantization_config.' if kind in (1, 2) else ''}{key}={target[key]!r}"
    path.write_text(json.dumps(cfg))
    (folder / "quantize_config.json").unlink(missing_ok=True)
    return what


def _mutate_safetensors(folder, rng):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.randrange(4)
    if kind == 0:  # truncate
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated at {cut}"
    if kind == 1:  # header length prefix
        data[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40, len(data) + 10]))
        path.write_bytes(bytes(data))
        return "header length"
    if kind == 2:  # a field of one tensor's header entry
        header = json.loads(data[8:8 + n])
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(
            {"dtype": ["F16", "I32", "BF16", "F64", "U8", "XX", 7],
             "shape": [[], [1], [2**31, 2**31], [-1, 4], "a", [3, 3, 3]],
             "data_offsets": [[0, 0], [0, 2**40], [5, 1], [0], "x"]}[field])
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:]))
        return f"{name}.{field}={header[name][field]!r}"
    for _ in range(rng.randrange(1, 20)):  # random bytes anywhere
        data[rng.randrange(len(data))] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return "byte flips"


def _alarm(signum, frame):
    raise TimeoutError("the reader hung")


def test_fuzz_checkpoint_reader(base_checkpoint, tmp_path):
    rng = random.Random(1234)
    old = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"OptqError": 0, "loaded": 0}
    try:
        for case in range(FUZZ_CASES):
            folder = tmp_path / f"c{case}"
            shutil.copytree(base_checkpoint, folder)
            what = (_mutate_config if rng.random() < 0.5 else _mutate_safetensors)(folder, rng)
            signal.alarm(30)
            try:
                optq.load(folder, dtype="float32")  # the reader; what Transformers does with junk flags it
                outcomes["loaded"] += 1                # accepts (output_hidden_states=7.5) is its business
            except OptqError:
                outcomes["OptqError"] += 1
            except Exception as e:  # noqa: BLE001 - the point of the test
                pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            shutil.rmtree(folder)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["OptqError"] > FUZZ_CASES // 4, outcomes  # the mutations do reach the checks
