"""optq's own CPU kernel (native/q4_gemm.cpp), compiled on first use and cached.

PyTorch's int4 CPU matmul converts every code to float32 and spends two FMAs on it; q4_gemm turns 32 codes
into bfloat16 with two integer instructions and one VDPBF16PS, about 3x faster per weight (K=2048, N=8192,
one row: 0.08 ms against 0.22 ms, benchmarks/kernel_speed.py), so decode becomes bound by memory bandwidth.
With float32 activations PyTorch's kernel is far slower still (11.6 ms for that shape, 4x a dense float32
matmul), and q4_gemm's float32 path (one FMA per weight) replaces it.
It needs AVX2 and FMA (float32 activations; AVX-512 F/BW/VL kernels where the CPU has them, AVX-512 BF16 for
bf16 activations) and a C++ compiler (the one torch.compile needs too). On a CPU with AVX2 but no AVX-512,
PyTorch's int4 kernel with float32 activations is slower still: 1.1 ms for one SmolLM2 576 x 1536 row against
the dense float32 matmul's 0.17 ms, and 1.9 s for 2048 rows against 23 ms; q4_gemm's AVX2 path replaces it.
Where the CPU or the compiler is missing the loader says why, once, and QuantLinear keeps PyTorch's kernels.
OPTQ_NATIVE=0 turns it off.
The same library holds the calibration kernels: causal attention (native/attention.cpp) and, on CPUs with
AVX-512 BF16, the X^T X of bf16 activations behind every Hessian (native/gram.cpp, 2.1-2.3x torch's path).

The library is built against the installed torch with `g++ -O3 -mavx2 -mfma` (the AVX-512 functions carry
their own target attributes and run only where the CPU has them), into
$OPTQ_CACHE (default ~/.cache/optq)/native/<hash of source, flags and torch version>/, written to a temporary
name and renamed, so concurrent first uses never load a half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..cache import cache_root
from ..core import choice

log = logging.getLogger("optq")

SOURCES = [Path(__file__).with_name("native") / name for name in ("q4_gemm.cpp", "attention.cpp", "gram.cpp")]
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-w"]

_state: dict[str, object] = {}


def cpu_supported() -> bool:
    """Whether the kernels run here at all (float32 activations): AVX2 and FMA."""
    caps = torch.cpu.get_capabilities()
    return all(caps.get(f) for f in ("avx2", "fma3"))


def avx512() -> bool:
    """Whether the kernels take their AVX-512 path here (the library decides the same way at run time)."""
    caps = torch.cpu.get_capabilities()
    return all(caps.get(f) for f in ("avx512_f", "avx512_bw", "avx512_vl"))


def bf16_supported() -> bool:
    """Whether the kernels take bf16 activations here (VDPBF16PS): q4_gemm, bf16 results, the attention."""
    return cpu_supported() and avx512() and bool(torch.cpu.get_capabilities().get("avx512_bf16"))


def cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str) -> Path:
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    libs = [f"-L{p}" for p in libdirs] + [f"-Wl,-rpath,{p}" for p in libdirs] + ["-ltorch", "-ltorch_cpu", "-lc10"]
    # The torch install (its path, for the rpath) is part of the key: each environment gets its own build.
    key = hashlib.sha256("\n".join([*(s.read_text() for s in SOURCES), cxx, abi, *FLAGS, torch.__version__,
                                    sys.version, *libdirs]).encode()).hexdigest()[:16]
    target = cache_dir() / key / "optq_native.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "optq_native.so"
        cmd = [cxx, *FLAGS, abi, *includes, *map(str, SOURCES), "-o", str(out), *libs]
        log.info("compiling optq's native CPU kernels (once per torch version, ~10-30 s)")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(out, target)
    return target


def load() -> bool:
    """Whether torch.ops.optq_native.q4_gemm is available (builds it on the first call)."""
    if "ok" in _state:
        return bool(_state["ok"])
    choice.remember_in(cache_root() / "kernel-choices.json")  # kernels chosen by measurement (core.choice)
    reason = None
    if os.environ.get("OPTQ_NATIVE", "1") == "0":
        reason = "OPTQ_NATIVE=0"
    elif not cpu_supported():
        reason = "this CPU has no AVX2 and FMA"
    elif _compiler() is None:
        reason = "no C++ compiler found (install g++ or set CXX)"
    if reason is None:
        try:
            torch.ops.load_library(str(_build(_compiler())))
            _register_fake()
        except Exception as e:  # a failed build must not stop loading: PyTorch's kernel still runs the model
            reason = f"its build failed: {e}"
    _state["ok"] = reason is None
    _state["reason"] = reason
    if reason is not None and reason != "OPTQ_NATIVE=0":
        log.warning("optq's native int4 kernel is off (%s); using PyTorch's int4 kernel, ~3x slower per weight",
                    reason)
    return reason is None


def why_unavailable() -> str | None:
    """None when the kernel is loaded, else the reason (after trying to load it)."""
    load()
    return _state["reason"]  # type: ignore[return-value]


def _register_fake() -> None:
    """Shape rule for torch.compile (which traces with tensors that hold no data)."""

    def q4_gemm_fake(x, packed, scale, zp, starts):
        return x.new_empty(x.shape[0], packed.shape[0] * 64)

    torch.library.register_fake("optq_native::q4_gemm", q4_gemm_fake)
    torch.library.register_fake("optq_native::q8_gemm", q4_gemm_fake)  # same output shape rule
