"""optq: GPTQ quantization of Hugging Face causal language models, and a runtime for the result."""

__version__ = "0.1.0"

from .config import QuantizeConfig  # noqa: E402
from .errors import OptqError  # noqa: E402


def load(path, dtype="auto", device="cpu", trust_remote_code=False, backend="auto"):
    """Load a GPTQ checkpoint folder as a Transformers model with optq QuantLinear modules."""
    from .runtime.load import load as _load

    return _load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, backend=backend)


def quantize(*args, **kwargs):
    """Quantize a model folder or .gguf file into a GPTQ checkpoint (see optq.api.quantize)."""
    from .api import quantize as _quantize

    return _quantize(*args, **kwargs)


from .hf_integration import register as _register_with_transformers  # noqa: E402

_register_with_transformers()  # Transformers' from_pretrained loads GPTQ checkpoints through optq (hf_integration)

__all__ = ["QuantizeConfig", "OptqError", "load", "quantize", "__version__"]
