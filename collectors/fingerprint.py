"""Model fingerprints: probes and baselines are only valid for the weights they were made on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

_PER_TENSOR = 1024


def fingerprint(model: torch.nn.Module) -> str:
    """A short stable hash of a model's architecture and weights.

    Hashes the class name, the architecture-defining config fields and, for every parameter, its
    name, shape and up to 1024 evenly strided values (in fp32). Any fine-tune, a different checkpoint
    or a different dtype gives another fingerprint; the same weights loaded from another file format
    give the same one. Cost: well under 100 ms for a 135M-parameter model.
    """
    return fingerprint_parameters(type(model).__name__, getattr(model, "config", None), model.named_parameters())


def fingerprint_parameters(
    class_name: str, config: object, named_parameters: Iterable[tuple[str, torch.Tensor]]
) -> str:
    """:func:`fingerprint` from its parts: the class name, the config and ``(name, tensor)`` pairs in module
    order. A server that holds the same weights under other names (vLLM's fused ``qkv_proj``) gives the same
    fingerprint by handing the ``transformers`` names and tensors here (:mod:`collectors.vllm.weights`).
    """
    h = hashlib.sha256()
    h.update(class_name.encode())
    if config is not None:
        keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "head_dim")
        h.update(json.dumps({k: getattr(config, k, None) for k in keep}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in named_parameters:
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _PER_TENSOR)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[::step][:_PER_TENSOR].to(torch.float32).cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]
