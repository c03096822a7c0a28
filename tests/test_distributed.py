"""Quantization across processes (torchrun, gloo): the same checkpoint bytes as one process; the calibration
shards and their fixed summation order."""

import os
import subprocess
import sys

import pytest
import torch

from optq.core.hessian import HessianAccumulator
from optq.distributed import ShardedHessians, shard_plan
from optq.errors import OptqError

from test_streaming import _same_checkpoint


@pytest.mark.parametrize("nwindows, shards", [(8, 8), (16, 8), (13, 5), (3, 8)])
def test_shard_plan_covers_every_window_once_in_shard_order(nwindows, shards):
    count = min(shards, nwindows)
    for world in range(1, count + 1):
        plans = [shard_plan(nwindows, shards, rank, world) for rank in range(world)]
        assert len({len(p.rounds) for p in plans}) == 1  # every process takes part in every round
        in_order = []
        for i in range(len(plans[0].rounds)):
            for p in plans:  # round i, rank order: shard order
                in_order += [p.windows[j] for j in p.rounds[i]]
        assert in_order == list(range(nwindows))
        # the shards themselves do not depend on the number of processes
        single = shard_plan(nwindows, shards)
        assert [[single.windows[j] for j in r] for r in single.rounds] == \
            [[p.windows[j] for j in p.rounds[i]] for i in range(len(plans[0].rounds)) for p in plans
             if i * world + plans.index(p) < count]
    with pytest.raises(OptqError, match="processes"):
        shard_plan(nwindows, shards, 0, count + 1)


def test_sharded_hessian_is_the_shard_sums_in_order():
    torch.manual_seed(0)
    xs = [torch.randn(64, 24) * (10 ** (i % 3)) for i in range(7)]  # magnitudes apart: order shows in the bits
    plan = shard_plan(len(xs), 3)
    hessians = ShardedHessians(["a", "b"], {"a": 24, "b": 24}, "cpu", asymmetric=False)
    part = HessianAccumulator(24)
    for windows in plan.rounds:
        for j in windows:
            part.add(xs[plan.windows[j]])
        hessians.end_round({"a": part, "b": part})  # a and b read the same input: one accumulator
    total = hessians.finish()
    assert total["a"] is total["b"]
    # independently: each shard summed from zero window by window, then the shards left to right
    sums = []
    for lo, hi in [(0, 2), (2, 4), (4, 7)]:
        s = torch.zeros(24, 24)
        for x in xs[lo:hi]:
            s.addmm_(x.T, x)
        sums.append(s)
    expected = (sums[0] + sums[1]) + sums[2]
    assert torch.equal(total["a"].xtx, expected)
    naive = torch.zeros(24, 24)
    for x in xs:
        naive.addmm_(x.T, x)
    assert not torch.equal(naive, expected)  # the data is such that the order shows in the bits
    assert total["a"].tokens == 7 * 64
    ref = sum(x.double().T @ x.double() for x in xs)
    torch.testing.assert_close(total["a"].xtx.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


REDUCE_SCRIPT = """
import sys
import torch
from safetensors.torch import save_file
from optq.core.hessian import HessianAccumulator
from optq.distributed import Cluster, ShardedHessians, shard_plan

cluster = Cluster.from_env("cpu")
rank, world = (cluster.rank, cluster.world) if cluster else (0, 1)
torch.manual_seed(0)
xs = [torch.randn(32, 16) * 10 ** (i % 4) for i in range(11)]
refs = [x + 0.01 * torch.randn_like(x) for x in xs]
plan = shard_plan(len(xs), 8, rank, world)
hessians = ShardedHessians(["a", "b", "c"], {"a": 16, "b": 16, "c": 16}, "cpu", True, cluster)
shared, alone = HessianAccumulator(16, asymmetric=True), HessianAccumulator(16, asymmetric=True)
for windows in plan.rounds:
    for j in windows:
        i = plan.windows[j]
        shared.add(xs[i], x_ref=refs[i])
        if i % 3:  # "c" is reached by some windows only, like an MoE expert
            alone.add(xs[i] * 2, x_ref=refs[i])
    hessians.end_round({"a": shared, "b": shared, "c": alone} if alone.tokens else {"a": shared, "b": shared})
total = hessians.finish()
assert total["a"] is total["b"]
out = {f"{n}.{k}": getattr(total[n], k) for n in "ac" for k in ("xtx", "dxtx")}
out.update({f"{n}.tokens": torch.tensor([total[n].tokens]) for n in "ac"})
save_file(out, f"{sys.argv[1]}.{rank}.safetensors")
if cluster:
    cluster.close()
"""


def test_reduction_across_processes_is_bitwise_the_single_process_one(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "reduce.py"
    script.write_text(REDUCE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                    "--nproc_per_node", "3", str(script), str(tmp_path / "three")], env=env, check=True, timeout=300)
    one = load_file(tmp_path / "one.0.safetensors")
    for rank in range(3):  # every rank ends with rank 0's totals, which are the single process's bits
        many = load_file(tmp_path / f"three.{rank}.safetensors")
        assert one.keys() == many.keys()
        for k in one:
            assert torch.equal(one[k], many[k]), (rank, k)


def _quantize(model, text, out, *flags, nproc=1):
    # One thread per process in both runs: LAPACK's Cholesky rounds differently with another thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    optq = ["-m", "optq", "quantize", str(model), str(out), "--dataset", str(text), "--nsamples", "8",
            "--seqlen", "64", "--quiet", *flags]
    if nproc == 1:
        cmd = [sys.executable, *optq]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(nproc), *optq]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.mark.parametrize("nproc, flags", [
    # streamed (the default for a folder), act-order, a quantized lm_head
    (2, ["--bits", "4", "--group-size", "32", "--desc-act", "--static-groups", "--lm-head"]),
    # the whole model in memory, GPTAQ's float stream, asymmetric v2, spilled activations
    (2, ["--no-stream", "--bits", "3", "--group-size", "32", "--asym", "--format", "gptq_v2", "--gptaq",
         "--max-activation-memory", "1KB"]),
    # three processes: uneven rounds (8 shards: ranks 0 and 1 compute three, rank 2 two)
    (3, ["--bits", "4", "--group-size", "64"]),
])
def test_several_processes_write_the_same_bytes_as_one(tinystories_model, tinystories_text, tmp_path, nproc, flags):
    _quantize(tinystories_model, tinystories_text, tmp_path / "one", *flags)
    p = _quantize(tinystories_model, tinystories_text, tmp_path / "many", *flags, nproc=nproc)
    assert p.stdout.count("wrote ") == 1  # rank 0 alone writes and says so
    _same_checkpoint(tmp_path / "one", tmp_path / "many")
    assert not list(tmp_path.glob(".*"))  # no other rank left a temporary folder or spill file behind
