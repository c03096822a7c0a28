"""Streamed quantization: the model stays on disk; one decoder layer at a time is read, quantized, written
into the output shards and freed, so peak memory is one layer plus the calibration activations whatever the
model's size. The pipeline (`quantize_model(stream=...)`) calls the hooks below at each step."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .formats.gptq import SAFETENSORS_METADATA, PlannedTensor, checkpoint_plan, checkpoint_value, packed_layout
from .formats.safetensors_writer import SafetensorsWriter
from .models.lazy import SafetensorsSource, materialize, release
from .models.registry import arch_spec, checkpoint_names
from .pipeline import planned_modules
from .sysmem import return_freed_memory

log = logging.getLogger("optq")

# Float tensors larger than this are converted and written a slice of rows at a time (embeddings, lm_head).
CHUNK_BYTES = 16 << 20


class StreamedModel:
    """A skeleton model (parameters on the meta device) bound to its safetensors files, and the writer of the
    checkpoint it becomes. Created before the first layer, so the checkpoint's layout is fixed up front.
    Without a `folder` it only reads (the processes other than rank 0 of a distributed run)."""

    def __init__(self, model: nn.Module, source: SafetensorsSource, config, dtype: torch.dtype, folder,
                 max_shard_size: int):
        self.model = model
        self.source = source
        self.layers_prefix = arch_spec(model.config.model_type).layers + "."
        layout = {name: packed_layout(in_f, out_f, mcfg.bits, mcfg.group_size)
                  for name, (in_f, out_f, mcfg) in planned_modules(model, config).items()}
        self.state = model.state_dict(keep_vars=True)  # meta tensors; tied ones are one object
        self.names = checkpoint_names(model.config.model_type)
        self.plan: list[PlannedTensor] = checkpoint_plan(self.state, layout, dtype, self.names)
        self.writer = SafetensorsWriter(folder, [p.spec for p in self.plan], max_shard_size, SAFETENSORS_METADATA) \
            if folder is not None else None

    # ---- hooks called by the pipeline ----

    def prepare_capture(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Read what runs before the first decoder layer (embeddings, ...): every tensor outside the decoder
        layers except the output projection (tied to the embeddings or not), which the capture never reaches:
        the checkpoint's copy is written from the file, and a quantized head reads its weight from there too."""
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if name.startswith(self.layers_prefix) or name + "." == self.layers_prefix:
                continue
            if module is head:
                continue
            if not any(t.device.type == "meta" for t in [*module.parameters(recurse=False),
                                                          *module.buffers(recurse=False)]):
                continue
            if type(module) is nn.Embedding:
                # The table stays in the file's dtype (half of float32's 2 GB for an 8B model) and each
                # looked-up row is cast: a gather then a cast gives the values of a cast then a gather.
                module.weight = nn.Parameter(self.source.get(f"{name}.weight"), requires_grad=False)
                module.register_forward_hook(lambda m, args, out: out.to(dtype))
            else:
                materialize(module, name, self.source, dtype, recurse=False)

    def after_capture(self, model: nn.Module) -> None:
        """Write every float tensor outside the decoder layers (not a quantized lm_head), then free the
        input embeddings: nothing needs them again."""
        emb = model.get_input_embeddings()
        if emb is not None:  # freed first: the writes below read the file again, a slice at a time
            release(emb)
        return_freed_memory()
        for p in self.plan if self.writer is not None else ():
            if not p.module and not p.key.startswith(self.layers_prefix):
                self._write_float(p)

    def load_layer(self, layer: nn.Module, prefix: str, dtype: torch.dtype, device) -> nn.Module:
        materialize(layer, prefix, self.source, dtype, device)
        return layer

    def source_weight(self, module_name: str) -> torch.Tensor:
        return self.source.get(f"{module_name}.weight", torch.float32)

    def emit(self, module_name: str, tensors: dict[str, torch.Tensor]) -> None:
        for leaf, t in tensors.items() if self.writer is not None else ():
            self.writer.write(self.names.to_checkpoint(f"{module_name}.{leaf}"), t)

    def finish_layer(self, layer: nn.Module, prefix: str) -> None:
        """Write the layer's float tensors (norms, biases) from the source, then free the layer."""
        for p in self.plan if self.writer is not None else ():
            if not p.module and p.key.startswith(prefix + "."):
                self._write_float(p)
        release(layer)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer._close_fds()

    # ---- helpers ----

    def _write_float(self, p: PlannedTensor) -> None:
        if not self.source.has(p.key):  # a buffer the model computes itself
            self.writer.write(p.spec.name, checkpoint_value(p, self.state[p.key]))
            return
        spec = p.spec
        if spec.nbytes <= CHUNK_BYTES or not spec.shape:
            self.writer.write(spec.name, checkpoint_value(p, self.source.get(p.key, torch.float32)))
            return
        step = max(1, CHUNK_BYTES // max(1, 4 * math.prod(spec.shape[1:])))  # rows, counted in float32
        for start in range(0, spec.shape[0], step):
            rows = self.source.rows(p.key, start, min(start + step, spec.shape[0]))
            if rows.is_floating_point():
                rows = rows.to(torch.float32)
            self.writer.write(spec.name, checkpoint_value(p, rows), row=start)
