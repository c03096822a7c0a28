"""Seeded random-weight Llama models of real shapes, for speed benchmarks (speed does not depend on weight values).

Writes, under --out (default bench-output/shapes):
  <shape>/            Hugging Face folder (config, bf16 safetensors, SmolLM2's tokenizer)
  <shape>.f16.gguf    the same shapes as a GGUF file with llama.cpp's tensor names and SmolLM2's tokenizer
  <shape>.q4_0.gguf   that file quantized to Q4_0 by llama.cpp itself (llama-cpp-python's llama_model_quantize)
Nothing here is committed: it is rebuilt from the seed.

Usage: python benchmarks/make_shapes.py [--shapes llama-1b,llama-3b,llama-8b] [--out bench-output/shapes]
(llama-8b: the HF folder only, 16 GB, written a tensor at a time; for benchmarks/quantize_speed.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

# Llama 3.2 1B / 3B layer shapes with SmolLM2's 49152-token vocabulary (so its tokenizer serves both formats).
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8),
    # Llama 3.1 8B, with its own vocabulary size (16 GB in bf16); SmolLM2's token ids all fall inside it.
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
VOCAB = 49152
# Shapes written tensor by tensor (never the whole model in memory), and without a GGUF twin.
STREAMED = {"llama-8b"}


def hf_config(shape: str):
    from transformers import LlamaConfig

    kw = {"vocab_size": VOCAB, "tie_word_embeddings": True, **SHAPES[shape]}
    return LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                       eos_token_id=2, **kw)


def make_hf(shape: str, folder: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    from optq.models.loading import load_tokenizer, smollm2_gguf_path

    torch.manual_seed(seed)
    cfg = hf_config(shape)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # Weights of a trained model's scale (std 0.02), so activations stay finite through all layers.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size="4GB")
    load_tokenizer(smollm2_gguf_path(), is_gguf=True).save_pretrained(folder)


def make_hf_streamed(shape: str, folder: Path, seed: int, shard: str = "5GB") -> None:
    """The same as make_hf, one tensor (and one slice of rows) at a time through optq's streaming safetensors
    writer: an 8B model is written with a few hundred MB of memory. Every tensor has its own seeded generator."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from optq.formats.gptq import SAFETENSORS_METADATA, parse_size
    from optq.formats.safetensors_writer import SafetensorsWriter, TensorSpec
    from optq.models.loading import load_tokenizer, smollm2_gguf_path

    cfg = hf_config(shape)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = list(skeleton.state_dict().items())
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(tmp, [TensorSpec(k, torch.bfloat16, tuple(t.shape)) for k, t in params],
                               parse_size(shard), SAFETENSORS_METADATA)
    for i, (name, t) in enumerate(params):
        if t.dim() == 1:  # norms
            writer.write(name, torch.ones(t.shape, dtype=torch.bfloat16))
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        step = max(1, (32 << 20) // t.shape[1])
        for r in range(0, t.shape[0], step):
            rows = min(step, t.shape[0] - r)
            writer.write(name, (torch.randn(rows, t.shape[1], generator=g) * 0.02).to(torch.bfloat16), row=r)
    writer.close()
    cfg.save_pretrained(tmp)
    load_tokenizer(smollm2_gguf_path(), is_gguf=True).save_pretrained(tmp)
    tmp.rename(folder)


def make_gguf(shape: str, path: Path, seed: int) -> None:
    """Random F16 tensors with llama.cpp's names and shapes; metadata (tokenizer included) from SmolLM2's GGUF."""
    import gguf

    from optq.models.loading import smollm2_gguf_path

    src = gguf.GGUFReader(str(smollm2_gguf_path()))
    cfg = hf_config(shape)
    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for field in src.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, field.contents())
        else:
            w.add_key_value(field.name, field.contents(), vtype)
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    h, kv = cfg.hidden_size, cfg.num_key_value_heads * head_dim
    w.add_tensor("token_embd.weight", rand(VOCAB, h))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(cfg.num_hidden_layers):
        for name, shape_ in (("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, h)),
                             ("ffn_gate", (cfg.intermediate_size, h)), ("ffn_up", (cfg.intermediate_size, h)),
                             ("ffn_down", (h, cfg.intermediate_size))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape_))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_quantize(src: Path, dst: Path, ftype: str = "Q4_0", f16_embeddings: bool = False) -> None:
    """llama.cpp's own quantization of a GGUF file; `f16_embeddings` keeps the token embedding and output
    matrices in F16 (as optq's export writes them) instead of llama.cpp's defaults."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if f16_embeddings:
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    params.nthread = 2
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) failed with {rc}")


def ensure(shape: str, out: Path, seed: int = 0, gguf: bool = True) -> tuple[Path, Path | None]:
    """(HF folder, Q4_0 GGUF) of `shape`, built once (gguf=False: the folder only; the GGUF needs llama_cpp)."""
    folder = out / shape
    if not (folder / "config.json").exists():
        (make_hf_streamed if shape in STREAMED else make_hf)(shape, folder, seed)
    q4 = out / f"{shape}.q4_0.gguf"
    if shape in STREAMED or not gguf:
        return folder, None
    if not q4.exists():
        f16 = out / f"{shape}.f16.gguf"
        make_gguf(shape, f16, seed)
        llama_cpp_quantize(f16, q4)
        f16.unlink()
    return folder, q4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-1b,llama-3b")
    ap.add_argument("--out", default=str(REPO / "bench-output" / "shapes"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        folder, q4 = ensure(shape, Path(a.out), a.seed)
        print(f"{shape}: {folder} {q4}")


if __name__ == "__main__":
    main()
