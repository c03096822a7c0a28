"""Quantizing a model layer by layer. The modules are the stages a layer goes through, in order:

- `plan`: which linears of a layer are quantized, in which sequential groups, with which config;
- `capture`: the first decoder layer's inputs for every calibration window;
- `activations`: the hidden states between layers (in memory, or spilled to files);
- `hessians`: a group's Hessians over the windows (one early-exit forward per window);
- `replay`: work nothing reads, skipped (finished blocks replayed, dead modules, shared-input outputs);
- `solve`: one module's GPTQ or RTN solve, the fallback, the held-out RTN guard;
- `driver`: `quantize_model`, the loop over layers and groups;
- `records`, `linears`: the log rows and result; Linear / Conv1D weights as [out, in].
"""

from .activations import HiddenStates, LayerInputs, SpillFiles
from .driver import quantize_model
from .hessians import _GroupCollector
from .linears import linear_shape, linear_weight, set_linear_weight
from .plan import planned_modules
from .records import RTN_FALLBACK, RTN_GUARD, ModuleLog, QuantizedModel
from .replay import _BlockReplay, _DeadModuleSkip
from .solve import _guard, _solve_module, split_held_out

__all__ = ["quantize_model", "planned_modules", "QuantizedModel", "ModuleLog", "HiddenStates", "LayerInputs",
           "SpillFiles", "linear_weight", "set_linear_weight", "linear_shape", "split_held_out", "RTN_FALLBACK",
           "RTN_GUARD", "_GroupCollector", "_BlockReplay", "_DeadModuleSkip", "_guard", "_solve_module"]
