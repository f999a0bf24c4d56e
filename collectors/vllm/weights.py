"""The model fingerprint of weights loaded by vLLM, equal to the ``transformers`` one for the same weights.

vLLM holds a checkpoint under its own module tree: attention's q, k and v projections fused into one
``qkv_proj``, the MLP's gate and up projections into ``gate_up_proj`` (the model class's
``packed_modules_mapping`` says which), the vocabulary padded to a multiple of 64. Baselines and probes
are keyed by the fingerprint of the ``transformers`` model (:mod:`collectors.fingerprint`), so the vLLM
tap hashes the *same* tensors under the *same* names, in the same order: it builds the ``transformers``
model of the served config on the ``meta`` device (names, shapes and order, no memory), then takes each
tensor from vLLM's parameters, slicing fused ones and padded rows away.

vLLM's CPU backend repacks linear layers into its own kernels' layout after loading and leaves their
``weight`` parameters empty; tensor parallelism leaves each worker a shard. Then the tensors come from the
checkpoint's safetensors files instead (the same names and order, cast to
the dtype vLLM serves in; it reads the checkpoint once more, from the page cache vLLM just filled).
When neither works (weights not in local safetensors files, an architecture whose vLLM layout differs in
another way), :class:`FingerprintMappingError` is raised and the tap falls back to a fingerprint of vLLM's
own parameters, prefixed ``vllm-sha256:``, with a warning: records are then valid only for baselines and
probes built from the same vLLM deployment.

The fingerprint includes the dtype: a model served in bfloat16 matches baselines built from the
``transformers`` model loaded in bfloat16, not in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from collectors.fingerprint import fingerprint_parameters


class FingerprintMappingError(ValueError):
    """vLLM's parameters do not map onto the ``transformers`` model's."""


def _hf_skeleton(hf_config: object) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _mapped(vllm_model: torch.nn.Module, skeleton: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    params = dict(vllm_model.named_parameters())
    packed: dict[str, list[str]] = dict(getattr(vllm_model, "packed_modules_mapping", None) or {})
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    member_of = {m: fused for fused, members in packed.items() for m in members}
    for name, shape in shapes.items():
        parts = name.split(".")
        tensor = params.get(name)
        offset = 0
        if tensor is None:
            # e.g. model.layers.0.self_attn.k_proj.weight -> model.layers.0.self_attn.qkv_proj.weight
            owner = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] in member_of), None)
            if owner is None:
                raise FingerprintMappingError(f"no vLLM parameter for {name}")
            fused = member_of[parts[owner]]
            fused_name = ".".join([*parts[:owner], fused, *parts[owner + 1:]])
            tensor = params.get(fused_name)
            if tensor is None:
                raise FingerprintMappingError(f"no vLLM parameter {fused_name} for {name}")
            for sibling in packed[fused]:
                if sibling == parts[owner]:
                    break
                sibling_name = ".".join([*parts[:owner], sibling, *parts[owner + 1:]])
                offset += shapes[sibling_name][0] if sibling_name in shapes else 0
        tensor = tensor.detach()
        if tensor.numel() == 0:
            raise FingerprintMappingError(f"{name}: vLLM repacked the weight (empty parameter)")
        if tensor.dim() != len(shape) or tuple(tensor.shape[1:]) != shape[1:] or tensor.shape[0] < offset + shape[0]:
            raise FingerprintMappingError(
                f"{name}: vLLM holds shape {tuple(tensor.shape)}, transformers {shape} (a shard?)")
        yield name, tensor[offset:offset + shape[0]]


def _from_checkpoint(folder: str | Path, shapes: list[tuple[str, tuple]],
                     dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``shapes`` from the safetensors files in ``folder``, each file opened once."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        raise FingerprintMappingError(f"no safetensors checkpoint in {folder}")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (safe_open has keys(), no __iter__)
        missing = [name for name, _ in shapes if name not in where]
        if missing:
            raise FingerprintMappingError(f"checkpoint in {folder} lacks {missing[0]} ({len(missing)} tensors)")
        for name, shape in shapes:
            t = where[name].get_tensor(name)
            if tuple(t.shape) != shape:
                raise FingerprintMappingError(f"{name}: checkpoint shape {tuple(t.shape)}, transformers {shape}")
            yield name, t.to(dtype)


def served_fingerprint(vllm_model: torch.nn.Module, hf_config: object, folder: str | Path,
                       dtype: torch.dtype) -> str:
    """The ``transformers`` fingerprint of the weights vLLM serves: from ``vllm_model``'s parameters, else
    (repacked or sharded weights) from the checkpoint in ``folder`` cast to ``dtype``; raises
    :class:`FingerprintMappingError` when neither maps."""
    skeleton = _hf_skeleton(hf_config)
    name = type(skeleton).__name__
    try:
        pairs = list(_mapped(vllm_model, skeleton))  # map every tensor before hashing any: all or nothing
        return fingerprint_parameters(name, hf_config, pairs)
    except FingerprintMappingError:
        pass
    shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    return fingerprint_parameters(name, hf_config, _from_checkpoint(folder, shapes, dtype))


def native_fingerprint(vllm_model: torch.nn.Module, hf_config: object) -> str:
    """A fingerprint of vLLM's own parameter layout (the fallback; see the module docstring)."""
    digest = fingerprint_parameters(type(vllm_model).__name__, hf_config, vllm_model.named_parameters())
    return "vllm-" + digest
