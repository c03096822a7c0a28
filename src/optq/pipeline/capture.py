"""Capturing the first decoder layer's inputs (hidden states and call arguments) for every window."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OptqError
from .activations import HiddenStates, SpillFiles, _dedupe
from .records import _StopForward


def _to(obj, device, dtype=None):
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, store: list, device=None, dtype=None):
        super().__init__()
        self.layer = layer
        self.store = store
        self.device, self.dtype = device, dtype

    def __getattr__(self, name):
        # Models read attributes of their layers (e.g. Gemma's attention_type): answer for the real layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        kwargs["use_cache"] = False
        for cache_arg in ("past_key_values", "past_key_value", "layer_past"):
            if kwargs.get(cache_arg) is not None:
                raise OptqError("decoder layer received a KV cache during calibration; this model is not supported")
        entry = (hidden.detach(), args, kwargs)
        # converted window by window: all windows in the model's dtype at once would double the peak
        self.store.append(_to(entry, self.device, self.dtype) if self.device is not None else entry)
        raise _StopForward


class _CaptureStore:
    """Where the capture puts each window as it is caught: its hidden states straight into a `HiddenStates`
    (in memory, or spilled to a file as `spill(width, item_size)` decides on the first window, so the
    activations are never all in memory at once), its arguments deduplicated against the earlier windows'."""

    def __init__(self, lengths: list[int], spill, files: "SpillFiles"):
        self.lengths, self.spill, self.files = lengths, spill, files
        self.hidden: HiddenStates | None = None
        self.extras: list[tuple] = []
        self._seen: dict[tuple, list[torch.Tensor]] = {}

    def append(self, entry) -> None:
        hidden, args, kwargs = entry
        j = len(self.extras)
        if self.hidden is None:
            shapes = [(*hidden.shape[:-2], n, hidden.shape[-1]) for n in self.lengths]
            spill = self.spill(hidden.shape[-1], hidden.element_size())
            self.hidden = HiddenStates(shapes, hidden.dtype, hidden.device, self.files if spill else None)
        if tuple(hidden.shape) != self.hidden.shapes[j]:
            raise OptqError(f"calibration window {j}: decoder layer 0 received hidden states of shape "
                            f"{tuple(hidden.shape)}, expected {self.hidden.shapes[j]}")
        self.hidden[j] = hidden
        self.extras.append((_dedupe(args, self._seen), _dedupe(kwargs, self._seen)))


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: list[torch.Tensor], device,
                         dtype: torch.dtype | None = None, store=None):
    """(hidden_states, positional args, kwargs) of each calibration window at the input of decoder layer 0,
    moved to `device` and, if given, their floating point tensors converted to `dtype`: appended to `store`
    (a list unless given)."""
    store = [] if store is None else store
    first = layers[0]
    layers[0] = _Catcher(first, store, torch.device(device) if dtype is not None else None, dtype)
    moved = device != torch.device("cpu")
    try:
        if moved:  # everything but the decoder layers goes to the device for this one pass
            stash = [layers[i] for i in range(1, len(layers))]
            for i in range(1, len(layers)):
                layers[i] = nn.Identity()
            model.to(device)
        with torch.no_grad():
            for ids in windows:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = first
        if moved:
            model.to("cpu")
            for i, layer in enumerate(stash, start=1):
                layers[i] = layer
    return store
