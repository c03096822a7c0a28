"""Interrupted quantizations resume from their last finished layer.

While `optq quantize` runs, each finished layer's quantized weights (codes, scales, zeros, g_idx: everything
the checkpoint and the next layer's inputs derive from) go to `.<OUT>.optq-partial/` beside the output,
written under a temporary name and renamed, so a file there is always whole, whatever kills the process.
`--resume` checks that the model, config and calibration tokens are the ones the partial run used, restores
the finished layers (their outputs are recomputed with the same weights and inputs, bit for bit), and goes on;
the final checkpoint is byte-identical to an uninterrupted run's. The partial folder is deleted once the
checkpoint is in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .core.grid import QuantizedWeight
from .errors import OptqError
from .formats.gptq import save_safetensors, write_failure

log = logging.getLogger("optq")

FINGERPRINT = "run.json"


def fault_point(name: str) -> None:
    """Testing hook: OPTQ_FAULT=<name> kills the process here with SIGKILL (tests/test_resume.py)."""
    if os.environ.get("OPTQ_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def windows_digest(windows: list[torch.Tensor] | None) -> str | None:
    if windows is None:
        return None
    h = hashlib.sha256()
    for w in windows:
        h.update(w.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def partial_dir(dest: str | os.PathLike) -> Path:
    dest = Path(dest)
    return dest.parent / f".{dest.name}.optq-partial"


class RunState:
    """The finished layers of one quantization run, on disk beside its output."""

    def __init__(self, dest: str | os.PathLike, fingerprint: dict[str, Any], resume: bool = False,
                 overwrite: bool = False):
        self.dest = Path(dest)
        self.dir = partial_dir(dest)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk
        if self.dir.exists():
            done = len(list(self.dir.glob("layer-*.safetensors")))
            # The checkpoint write the interruption cut short (a streamed run writes from its first layer on):
            # worthless whether or not the run is resumed, since a resumed run rewrites every tensor.
            for stale in self.dest.parent.glob(f".{self.dest.name}.optq-tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if resume:
                self._check(done)
                log.info("resuming %s: %d finished layer(s) restored from %s", self.dest, done, self.dir)
                return
            if not overwrite:
                raise OptqError(f"{self.dest}: an interrupted run was found ({done} layer(s) done, in {self.dir}): "
                                "pass --resume to continue it, or --overwrite to start over")
            shutil.rmtree(self.dir)
        try:
            self.dir.mkdir()
            self._write_json(self.dir / FINGERPRINT, self.fingerprint)
        except OSError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise OptqError(write_failure(self.dest, e)) from None

    def _check(self, done: int) -> None:
        try:
            saved = json.loads((self.dir / FINGERPRINT).read_text())
        except (OSError, ValueError):
            raise OptqError(f"{self.dir} has no readable {FINGERPRINT}: it cannot be resumed; delete it or pass "
                            "--overwrite") from None
        differ = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differ:
            raise OptqError(f"the interrupted run in {self.dir} used a different {', '.join(differ)}: resume with "
                            "the same model, config and calibration, or pass --overwrite to start over")

    @staticmethod
    def _write_json(path: Path, obj: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _layer_file(self, index: int) -> Path:
        return self.dir / f"layer-{index:05d}.safetensors"

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], list[dict[str, Any]]] | None:
        """(quantized weights by module name, log rows) of a finished layer, or None."""
        path = self._layer_file(index)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["optq"])
                weights = {}
                for name, m in meta["modules"].items():
                    perm = f.get_tensor(f"{name}.perm") if m["has_perm"] else None
                    weights[name] = QuantizedWeight(
                        f.get_tensor(f"{name}.qweight").to(torch.int32), f.get_tensor(f"{name}.scales"),
                        f.get_tensor(f"{name}.zeros"), f.get_tensor(f"{name}.g_idx"), m["bits"], m["group_size"],
                        perm)
        except Exception as e:  # safetensors and json raise their own types; all mean the same here
            raise OptqError(f"{path} is unreadable ({e}): delete {self.dir} or pass --overwrite to start over") \
                from None
        return weights, meta["rows"]

    def save(self, index: int, weights: dict[str, QuantizedWeight], rows: list[Any]) -> None:
        tensors, modules = {}, {}
        for name, qw in weights.items():
            tensors[f"{name}.qweight"] = qw.qweight.to(torch.uint8 if qw.bits <= 8 else torch.int32).contiguous()
            tensors[f"{name}.scales"] = qw.scales.contiguous()
            tensors[f"{name}.zeros"] = qw.zeros.contiguous()
            tensors[f"{name}.g_idx"] = qw.g_idx.contiguous()
            if qw.perm is not None:
                tensors[f"{name}.perm"] = qw.perm.contiguous()
            modules[name] = {"bits": qw.bits, "group_size": qw.group_size, "has_perm": qw.perm is not None}
        meta = {"modules": modules, "rows": [dataclasses.asdict(r) for r in rows]}
        path = self._layer_file(index)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_safetensors(tensors, tmp, {"optq": json.dumps(meta)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OptqError(write_failure(self.dest, e)) from None

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
