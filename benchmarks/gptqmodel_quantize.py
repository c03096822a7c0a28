"""Quantize with GPTQModel (run with the Python of the venv made by gptqmodel_env.sh).

The calibration windows come from a safetensors file written by quality_smollm2.py, so both tools see the same
tokens. Settings mirror optq's: symmetric, damp 0.01, no MSE, true-sequential; act-order, static groups and GPTAQ
(alpha 0.25, optq's default) as flags named like optq's.
"""

import argparse
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--windows", required=True, help="safetensors file with a 'windows' int64 tensor [n, seqlen]")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--gptaq", action="store_true", help="GPTQModel's GPTAQ (asymmetric calibration)")
    ap.add_argument("--gptaq-alpha", type=float, default=0.25)
    a = ap.parse_args()

    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig

    windows = load_file(a.windows)["windows"]
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, desc_act=a.desc_act, sym=True, damp_percent=a.damp,
                         act_group_aware=False, mse=0.0, offload_to_disk=False,
                         static_groups=a.static_groups,
                         gptaq=GPTAQConfig(alpha=a.gptaq_alpha, device="cpu") if a.gptaq else None)
    t0 = time.perf_counter()
    model = GPTQModel.load(a.model, cfg, dtype=getattr(torch, a.dtype))
    model.quantize(calibration, batch_size=1)
    model.save(a.out)
    print(f"gptqmodel quantize+save seconds {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
