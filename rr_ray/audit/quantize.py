"""Quantization attack: the merged weights stored at fewer bits, then read back (fake quantization).

An unlearning edit that is small next to a quantization step can vanish when the model is deployed at 4 bits
(Zhang et al., ICLR 2025, MUSE: 21 % of the forgotten knowledge kept at full precision became 83 % at 4 bits).
Two schemes, each at 8 and 4 bits, over every linear layer of the decoder (the output head stays as it is,
as deployments usually keep it):

- ``rtn8`` / ``rtn4``: round-to-nearest, asymmetric min-max per group of ``group`` input weights;
- ``gguf-q8_0`` / ``gguf-q4_0``: llama.cpp's Q8_0 and Q4_0 block formats, through the ``gguf`` library's own
  quantize and dequantize (blocks of 32 weights with one scale: the format CPU deployments of small models use).
"""

from __future__ import annotations

from typing import Any

SCHEMES = ("rtn8", "rtn4", "gguf-q8_0", "gguf-q4_0")


def rtn(weight: Any, bits: int, group: int) -> Any:
    """Round-to-nearest with one scale and zero point per ``group`` consecutive inputs of each output row."""
    import torch

    out_f, in_f = weight.shape
    g = group if in_f % group == 0 else in_f
    w = weight.detach().float().reshape(out_f, in_f // g, g)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_f, in_f).to(weight.dtype)


def gguf_roundtrip(weight: Any, qtype_name: str) -> Any:
    """``weight`` quantized to a GGML type (e.g. "Q4_0") by the gguf library and dequantized again."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[qtype_name]
    arr = weight.detach().float().cpu().numpy().astype(np.float32)
    back = quants.dequantize(quants.quantize(arr, qtype), qtype).reshape(arr.shape)
    return torch.from_numpy(np.ascontiguousarray(back)).to(weight.dtype)


def quantize_linear_weights(model: Any, scheme: str, group: int = 128) -> dict[str, Any]:
    """Replace every decoder nn.Linear weight of ``model`` in place by its ``scheme`` round trip; returns
    {"layers": count, "mean_abs_change": mean |w' - w| / mean |w|}."""
    import torch

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {SCHEMES}")
    head = model.get_output_embeddings()
    count, change, size = 0, 0.0, 0.0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            w = module.weight
            if scheme.startswith("rtn"):
                new = rtn(w, int(scheme[3:]), group)
            else:
                new = gguf_roundtrip(w, scheme.split("-", 1)[1].upper())
            change += float((new.float() - w.float()).abs().sum())
            size += float(w.float().abs().sum())
            w.copy_(new)
            count += 1
    return {"layers": count, "mean_abs_change": change / size if size else 0.0}
