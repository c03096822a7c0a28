"""GPTQ checkpoint -> GGUF file that llama.cpp runs on its own (optq export-gguf).

Exact mappings (GGUF blocks are 32 consecutive input columns with one fp16 scale, so a GPTQ group of 32
contiguous columns is one block):
  4-bit, group 32, symmetric (zero 8)   -> Q4_0: d = scale, nibble = code            w = d * (code - 8)
  4-bit, group 32, asymmetric           -> Q4_1: d = scale, m = -scale * zero         w = d * code + m
  8-bit, group 32, symmetric (zero 128) -> Q8_0: d = scale, int8 = code - 128         w = d * int8
GPTQ scales are fp16 already, so Q4_0 and Q8_0 reproduce the checkpoint's weights bit for bit; Q4_1's m is
-scale * zero rounded to fp16, the one place rounding enters (at most half an fp16 ulp of m per group).
Act-order with static groups keeps groups contiguous (g_idx = column // 32) and maps the same way. Any other
grouping (group size 128, per channel, 2/3-bit, 8-bit asymmetric) is re-blocked only with `requantize`, which
dequantizes and lets the gguf library's Q4_0/Q8_0 quantizer round again (GPTQ's error compensation is then
partly lost; a warning says so). Act-order without static groups scatters each group's columns and is refused.
Other tensors: 1-D (norms, biases) as F32, the rest as F16 (or F32 with float_type="f32").
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..core.grid import QuantizedWeight
from ..errors import OptqError
from .gptq import iter_tensors, open_checkpoint, quantized_module_names, unpack_module

log = logging.getLogger("optq")

BLOCK = 32
# Hugging Face model_type -> (gguf architecture name, whether q/k rows are permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _ggml_type(qw: QuantizedWeight, sym_zero: int):
    import gguf

    T = gguf.GGMLQuantizationType
    contiguous = torch.equal(qw.g_idx.long(), torch.arange(qw.g_idx.numel()) // BLOCK)
    if qw.group_size != BLOCK or not contiguous:
        return None
    if qw.bits == 4:
        return T.Q4_0 if bool((qw.zeros == sym_zero).all()) else T.Q4_1
    if qw.bits == 8 and bool((qw.zeros == sym_zero).all()):
        return T.Q8_0
    return None


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def encode_blocks(qw: QuantizedWeight, ggml_type) -> np.ndarray:
    """The GGUF bytes [out, in / 32 * block bytes] of a weight whose groups are 32 contiguous columns."""
    import gguf

    T = gguf.GGMLQuantizationType
    out_f, in_f = qw.qweight.shape
    nb = in_f // BLOCK
    codes = qw.qweight.reshape(out_f, nb, BLOCK).to(torch.int32)
    scale = qw.scales.T.contiguous()  # [out, groups]: fp16 values held in float32
    zero = qw.zeros.T.contiguous()
    d = _f16_bytes(scale)  # [out, nb, 2]
    if ggml_type in (T.Q4_0, T.Q4_1):
        nib = (codes[:, :, :16] | (codes[:, :, 16:] << 4)).to(torch.uint8).numpy()  # [out, nb, 16]
        parts = [d, nib] if ggml_type == T.Q4_0 else [d, _f16_bytes(-scale * zero), nib]
    elif ggml_type == T.Q8_0:
        parts = [d, (codes - 128).to(torch.int8).numpy().view(np.uint8)]
    else:
        raise ValueError(f"no exact encoding for {ggml_type}")
    return np.concatenate(parts, axis=2).reshape(out_f, -1)


def _permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp order of q/k output rows (its rope pairs adjacent dims, HF's pairs the two halves)."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _permute_qw(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    return QuantizedWeight(_permute_rows(qw.qweight, n_head), _permute_rows(qw.scales.T, n_head).T.contiguous(),
                           _permute_rows(qw.zeros.T, n_head).T.contiguous(), qw.g_idx, qw.bits, qw.group_size)


def _add_tokenizer(writer, folder: Path, tokenizer_from: str | None, tokenizer_pre: str) -> None:
    import gguf

    if tokenizer_from:
        src = gguf.GGUFReader(str(tokenizer_from))
        fields = [f for f in src.fields.values() if f.name.startswith("tokenizer.")]
        if not fields:
            raise OptqError(f"{tokenizer_from} holds no tokenizer.* metadata to copy")
        for field in fields:
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, field.contents())
            else:
                writer.add_key_value(field.name, field.contents(), field.types[0])
        return
    vocab = None
    for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = cls(folder)
            break
        except (FileNotFoundError, TypeError, ValueError, KeyError, ImportError):
            continue
    if vocab is None:
        raise OptqError(f"{folder} has no tokenizer the gguf library can convert (a byte-level BPE or Llama "
                        "tokenizer.json): pass --tokenizer-from FILE.gguf to copy one from a GGUF file")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)


def export_gguf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    requantize: bool = False,
    float_type: str = "f16",
    tokenizer_from: str | None = None,
    tokenizer_pre: str = "default",
    overwrite: bool = False,
) -> dict[str, int]:
    """Write `out` (.gguf) from a GPTQ checkpoint folder; returns how many tensors got each GGUF type."""
    import gguf

    T = gguf.GGMLQuantizationType
    out = Path(out)
    if out.exists() and not overwrite:
        raise OptqError(f"{out} already exists: choose another path or pass --overwrite")
    if float_type not in ("f16", "f32"):
        raise OptqError(f"float type {float_type!r}: use f16 or f32")
    info = open_checkpoint(checkpoint)
    cfg = info.config
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise OptqError(f"export-gguf supports model types {', '.join(ARCHITECTURES)}; this checkpoint is "
                        f"{model_type!r}")
    arch, permute = ARCHITECTURES[model_type]
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise OptqError("the model uses rope scaling, which export-gguf does not write yet")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    if info.source != "gptq":
        raise OptqError(f"export-gguf reads GPTQ checkpoints; {info.path} is {info.source}")
    qmods = quantized_module_names(info)
    counts: dict[str, int] = {}
    sym_zero = lambda bits: 1 << (bits - 1)  # noqa: E731  GPTQ's symmetric zero point

    tmp = out.with_name(f".{out.name}.optq-tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(out.stem)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, info.path, tokenizer_from, tokenizer_pre)

    pieces: dict[str, dict[str, torch.Tensor]] = {}
    floats: dict[str, torch.Tensor] = {}
    for key, t in iter_tensors(info, {}):
        module, _, leaf = key.rpartition(".")
        if module in qmods and leaf in ("qweight", "qzeros", "scales", "g_idx"):
            pieces.setdefault(module, {})[leaf] = t
        else:
            floats[key] = t
    file_type = None
    try:
        for name in qmods:
            mcfg = info.quant.for_module(name)
            p = pieces[name]
            in_f, out_f = p["g_idx"].numel(), p["scales"].shape[1]
            qw = unpack_module(p, mcfg.bits, in_f, out_f, info.quant.checkpoint_format)
            qw.group_size = mcfg.group_size
            gguf_name = names.get_name(name + ".weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise OptqError(f"the gguf library has no GGUF name for {name} in a {arch} model")
            if permute and re.search(r"\.(q_proj|k_proj)$", name):
                qw = _permute_qw(qw, n_head if name.endswith("q_proj") else n_kv)
            gtype = _ggml_type(qw, sym_zero(qw.bits))
            if gtype is not None:
                data = encode_blocks(qw, gtype)
            else:
                contiguous = torch.equal(qw.g_idx.long(), torch.sort(qw.g_idx.long()).values)
                if not contiguous:
                    raise OptqError(f"{name}: act-order without static groups scatters each group's columns, "
                                    "and a GGUF block is 32 consecutive columns with one scale: quantize with "
                                    "--desc-act --static-groups (or without --desc-act) for a GGUF export")
                if not requantize:
                    raise OptqError(f"{name}: {mcfg.bits}-bit group size {mcfg.group_size}"
                                    f"{'' if info.quant.sym else ' asymmetric'} has no exact GGUF type (Q4_0/Q4_1 "
                                    "need 4-bit group 32, Q8_0 8-bit symmetric group 32): re-quantize with "
                                    "--bits 4 --group-size 32, or pass --requantize to re-block it (it rounds again)")
                gtype = T.Q8_0 if qw.bits == 8 else T.Q4_0
                if in_f % BLOCK:
                    raise OptqError(f"{name}: {in_f} input columns are not a multiple of 32, GGUF's block")
                log.warning("%s: %d-bit g%d re-blocked to %s by rounding again (--requantize)", name, qw.bits,
                            mcfg.group_size, gtype.name)
                data = gguf.quants.quantize(qw.dequantize().numpy().astype(np.float32), gtype)
            writer.add_tensor(gguf_name, data, raw_dtype=gtype)
            counts[gtype.name] = counts.get(gtype.name, 0) + 1
            file_type = file_type or {T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
                                      T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[gtype]
        # a tied output projection has no tensor of its own: llama.cpp then reads token_embd
        for key, t in floats.items():
            if permute and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", key):  # biases of quantized ones too
                t = _permute_rows(t, n_head if ".q_proj." in key else n_kv)
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                if "rotary_emb" in key:
                    continue
                raise OptqError(f"the gguf library has no GGUF name for tensor {key} in a {arch} model")
            as_f32 = t.dim() == 1 or float_type == "f32"
            arr = t.to(torch.float32 if as_f32 else torch.float16).numpy()
            writer.add_tensor(gguf_name, arr, raw_dtype=T.F32 if as_f32 else T.F16)
            kind = "F32" if as_f32 else "F16"
            counts[kind] = counts.get(kind, 0) + 1
        writer.add_file_type(file_type or gguf.LlamaFileType.MOSTLY_F16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return counts
