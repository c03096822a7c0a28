"""Logits of GPTQ checkpoints as GPTQModel computes them (run with the Python of gptqmodel_env.sh's venv).

    python gptqmodel_logits.py IDS.safetensors OUT.safetensors CHECKPOINT [CHECKPOINT ...]

Loads each checkpoint with GPTQModel's torch kernel on CPU in float16 (its only CPU dtypes: fp16, bf16) and
writes `<i>.logits` for the `input_ids` in IDS, plus each quantized module's dequantized weight as
`<i>.<module>.weight`.
"""

import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main() -> None:
    ids_file, out_file, *checkpoints = sys.argv[1:]
    from gptqmodel import BACKEND, GPTQModel

    ids = load_file(ids_file)["input_ids"]
    out = {}
    for i, path in enumerate(checkpoints):
        model = GPTQModel.load(path, backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
        with torch.no_grad():
            out[f"{i}.logits"] = model.model(ids).logits.float().contiguous()
            for name, m in model.model.named_modules():
                if hasattr(m, "qweight") and hasattr(m, "dequantize_weight"):
                    w = m.dequantize_weight()
                    if tuple(w.shape) == (m.in_features, m.out_features):  # GPTQModel's layout is [in, out]
                        w = w.T
                    out[f"{i}.{name}.weight"] = w.float().contiguous()
        del model
    save_file(out, out_file)


if __name__ == "__main__":
    main()
