"""Compiled decode: Transformers' static KV cache plus torch.compile (inductor) of the model's forward.

It pays on this CPU once compiled (benchmarks/compile_decode.py: SmolLM2 4-bit 10.7 -> 9.0 ms per step,
llama-1b 4-bit 21.2 -> 19.8 ms) but compiling takes 20-30 s, and a new prompt or output length recompiles:
worth it for many generations of one shape (serving, benchmarks), not for one short answer.
"""

from __future__ import annotations

from torch import nn


def use_compiled_decode(model: nn.Module) -> None:
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # Transformers compiles only on accelerators unless told otherwise
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
