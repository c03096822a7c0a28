"""Quantization across processes with PyTorch's own distributed runtime (`torchrun`): gloo on CPU, nccl on GPU.

The calibration windows are cut into `shards` contiguous shards, a number that does not depend on how many
processes run. Shard k is computed by process k % world, in rounds of `world` shards. Each process keeps the
hidden states of its own windows only, and sums each shard's X^T X separately; after every round rank 0 adds
the round's shard sums to the totals in shard order. So every Hessian is ((S0 + S1) + S2) + ... whatever the
number of processes, which is what makes a run on N processes byte-identical to a run on one (given the same
threads per process: LAPACK's Cholesky rounds differently with another thread count). The modules of a group
are solved on different ranks (module i of the group on rank i % world) and their results broadcast; rank 0
writes the checkpoint.

Only tensors travel between processes (no pickled objects): every receiver knows the shapes from the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .core.hessian import HessianAccumulator
from .core.grid import QuantizedWeight
from .errors import OptqError
from .models.moe import is_routed


@dataclass
class ShardPlan:
    """The calibration windows one process computes and the rounds in which their shard sums are reduced."""

    windows: list[int]  # global window indices, in the order this process computes them
    rounds: list[range]  # per round, this process's windows (indices into `windows`); empty when it has none


def shard_plan(nwindows: int, shards: int, rank: int = 0, world: int = 1) -> ShardPlan:
    if shards < 1:
        raise OptqError("--hessian-shards must be at least 1")
    count = min(shards, nwindows)
    if world > count:
        raise OptqError(f"{world} processes but only {count} calibration shards (--hessian-shards {shards}, "
                        f"{nwindows} windows): run at most {count} processes, or raise --hessian-shards")
    bounds = [(k * nwindows // count, (k + 1) * nwindows // count) for k in range(count)]
    windows: list[int] = []
    rounds: list[range] = []
    for first in range(0, count, world):
        shard = first + rank
        start = len(windows)
        if shard < count:
            windows.extend(range(*bounds[shard]))
        rounds.append(range(start, len(windows)))
    return ShardPlan(windows, rounds)


class Cluster:
    """This process's place among the processes torchrun started, and the collectives the pipeline needs."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_env(cls, device: str | torch.device) -> "Cluster | None":
        """The cluster torchrun describes in the environment (WORLD_SIZE > 1), its process group started
        (nccl for a CUDA device, gloo otherwise); None for a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch.distributed as dist

        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            except (RuntimeError, ValueError) as e:
                raise OptqError(f"cannot join the other {world - 1} processes ({e}): start optq with torchrun, "
                                "which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ---- point to point and broadcast, through the backend's device ----

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if t.device != self.device else t

    def send(self, t: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        dist.send(self._out(t.contiguous()), dst)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        import torch.distributed as dist

        buf = self._out(t)
        dist.recv(buf, src)
        return buf.to(t.device) if buf is not t else t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """`t` from rank `src` (the others pass a buffer of the same shape and dtype)."""
        import torch.distributed as dist

        buf = self._out(t.contiguous())
        dist.broadcast(buf, src)
        return buf.to(t.device) if buf is not t else t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's `t`."""
        import torch.distributed as dist

        parts = [torch.empty_like(self._out(t)) for _ in range(self.world)]
        dist.all_gather(parts, self._out(t))
        return torch.stack(parts).to(t.device)


class ShardedHessians:
    """The Hessian totals of one group of modules, summed shard by shard in a fixed order (see the module
    docstring). `end_round` takes the round's partial accumulators, `finish` gives each module its total."""

    def __init__(self, names: list[str], columns: dict[str, int], device, asymmetric: bool,
                 cluster: Cluster | None = None):
        self.names, self.columns, self.device, self.asymmetric = names, columns, device, asymmetric
        self.cluster = cluster
        self.rep: dict[str, str] = {}  # module -> the first module (in plan order) reading the same input
        self.totals: dict[str, HessianAccumulator] = {}

    def _new(self, name: str) -> HessianAccumulator:
        # an MoE expert's linear has no GPTAQ cross term (see pipeline.hessians): no d x d for it
        return HessianAccumulator(self.columns[name], device=self.device,
                                  asymmetric=self.asymmetric and not is_routed(name))

    def _sharing(self, partials: dict[str, HessianAccumulator]) -> list[int]:
        """Per module, the index of its representative this round (-1: no process reached it), the same on
        every process: modules read the same input everywhere (an MoE expert may be reached on one only)."""
        index = {id(a): i for i, n in reversed(list(enumerate(self.names))) if (a := partials.get(n)) is not None}
        mine = [index[id(partials[n])] if n in partials else -1 for n in self.names]
        if self.cluster is None:
            return mine
        seen = self.cluster.all_gather(torch.tensor(mine, dtype=torch.int64))
        out = []
        for i, name in enumerate(self.names):
            values = {int(v) for v in seen[:, i] if v >= 0}
            if len(values) > 1:
                raise OptqError(f"{name} shares its input with different modules on different processes")
            out.append(values.pop() if values else -1)
        return out

    def end_round(self, partials: dict[str, HessianAccumulator]) -> None:
        """Add this round's shard sums (one per process, in rank order, which is shard order) to the totals,
        which rank 0 holds; the partial accumulators are emptied."""
        sharing = self._sharing(partials)
        for i, r in enumerate(sharing):
            if r >= 0:
                rep = self.names[r]
                if self.rep.setdefault(self.names[i], rep) != rep:
                    raise OptqError(f"{self.names[i]} changed which modules share its input between shards")
        for r in sorted({r for r in sharing if r >= 0}):
            rep = self.names[r]
            part = partials.get(rep) or self._new(rep)
            if self.cluster is None or self.cluster.rank == 0:
                total = self.totals.setdefault(rep, self._new(rep))
                total.absorb(part)
                for src in range(1, self.cluster.world if self.cluster else 1):
                    total.absorb(self._receive(rep, src))
            else:
                self._send(part, 0)
        for part in partials.values():
            part.xtx = part.dxtx = None
            part.tokens = 0

    def _send(self, acc: HessianAccumulator, dst: int) -> None:
        self.cluster.send(torch.tensor([acc.tokens], dtype=torch.int64), dst)
        if acc.tokens:
            self.cluster.send(acc.xtx, dst)
            if acc.asymmetric:
                self.cluster.send(acc.dxtx, dst)

    def _receive(self, name: str, src: int) -> HessianAccumulator:
        acc = self._new(name)
        acc.tokens = int(self.cluster.recv(torch.zeros(1, dtype=torch.int64), src)[0])
        if acc.tokens:
            d = self.columns[name]
            acc.xtx = self.cluster.recv(torch.empty(d, d, device=self.device), src)
            if acc.asymmetric:
                acc.dxtx = self.cluster.recv(torch.empty(d, d, device=self.device), src)
        return acc

    def finish(self) -> dict[str, HessianAccumulator]:
        """Each module's total accumulator (modules sharing an input share it; one no calibration token reached
        has an empty one), on every process."""
        out: dict[str, HessianAccumulator] = {}
        for name in self.names:
            rep = self.rep.get(name, name)
            if rep not in out:
                total = self.totals.pop(rep, None) or self._new(rep)
                if self.cluster is not None:
                    total = self._broadcast(total, rep)
                out[rep] = total
            out[name] = out[rep]
        return out

    def _broadcast(self, acc: HessianAccumulator, name: str) -> HessianAccumulator:
        c = self.cluster
        tokens = int(c.broadcast(torch.tensor([acc.tokens], dtype=torch.int64), 0)[0])
        if tokens and c.rank != 0:
            d = self.columns[name]
            acc.xtx = torch.empty(d, d, device=self.device)
            acc.dxtx = torch.empty(d, d, device=self.device) if self.asymmetric else None
        if tokens:
            acc.xtx = c.broadcast(acc.xtx, 0)
            if self.asymmetric:
                acc.dxtx = c.broadcast(acc.dxtx, 0)
        acc.tokens = tokens
        return acc


def share_solution(cluster: Cluster, owner: int, solved, in_features: int, out_features: int, bits: int,
                   group_size: int):
    # The receivers' buffers follow QuantizedWeight's layout: qweight [out, in] int32, scales and zeros
    # [groups, out] float32, g_idx [in] int32, perm [in] (act-order only).
    """(QuantizedWeight, loss, damp, note) as rank `owner` solved it, on every rank (`solved` is that tuple on
    the owner, None elsewhere)."""
    if cluster.rank == owner:
        qw, loss, damp, note = solved
        note_bytes = torch.tensor(list(note.encode()), dtype=torch.uint8)
        head = torch.tensor([qw.scales.shape[0], qw.perm is not None, len(note_bytes)], dtype=torch.int64)
        floats = torch.tensor([loss, damp], dtype=torch.float64)
    else:
        head = torch.zeros(3, dtype=torch.int64)
        floats = torch.zeros(2, dtype=torch.float64)
    head = cluster.broadcast(head, owner)
    floats = cluster.broadcast(floats, owner)
    ngroups, has_perm, note_len = (int(v) for v in head)
    if cluster.rank == owner:
        tensors = [qw.qweight.to(torch.int32), qw.scales.to(torch.float32), qw.zeros.to(torch.float32),
                   qw.g_idx.to(torch.int32)]
        perm = qw.perm
    else:
        tensors = [torch.empty(out_features, in_features, dtype=torch.int32),
                   torch.empty(ngroups, out_features), torch.empty(ngroups, out_features),
                   torch.empty(in_features, dtype=torch.int32)]
        perm = torch.empty(in_features, dtype=torch.int64) if has_perm else None
        note_bytes = torch.empty(note_len, dtype=torch.uint8)
    tensors = [cluster.broadcast(t, owner) for t in tensors]
    if has_perm:
        perm = cluster.broadcast(perm.to(torch.int64), owner)
    if note_len:
        note_bytes = cluster.broadcast(note_bytes, owner)
    if cluster.rank == owner:
        return solved
    qw = QuantizedWeight(*tensors, bits=bits, group_size=group_size, perm=perm)
    note = bytes(note_bytes.tolist()).decode() if note_len else ""
    return qw, float(floats[0]), float(floats[1]), note
