"""Readable hook-site names and their resolution to module paths.

Users name what they watch the way they think about a transformer:

=====================  =============================================================
``embed``              token embeddings (input to block 0)
``layers.N.resid``     residual stream after block N (the block's output)
``layers.N.attn``      attention of block N: per-head attention statistics
``layers.N.mlp``       output of block N's MLP
``final``              output of the final norm (what the unembedding reads)
``<module.path>``      any other module by its ``named_modules`` path (output pooled)
=====================  =============================================================

Names resolve per architecture family (Llama/Qwen/Gemma/Mistral-style decoders, GPT-2-style
decoders, BERT-style encoders); anything else is found by looking for the model's stack of blocks
(the largest ``ModuleList`` of identical modules) or addressed by raw module path.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from torch import nn

SITE_RE = re.compile(r"^layers\.(\d+)\.(resid|attn|mlp)$")

# Where the pieces live, relative to the stack of blocks, per family (first match wins).
_ATTN_CHILD = ("self_attn", "attn", "attention.self", "self_attention", "attention")
_MLP_CHILD = ("mlp", "feed_forward", "ffn", "output")
_EMBED = ("model.embed_tokens", "embed_tokens", "transformer.wte", "embeddings", "bert.embeddings",
          "model.embeddings", "gpt_neox.embed_in")
_FINAL = ("model.norm", "norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")


@dataclass(frozen=True)
class Site:
    """One resolved hook site.

    ``kind`` is ``"resid"`` (pooled activations of a module's output) or ``"attn"`` (attention statistics
    of an attention module). ``module_path`` is the ``named_modules`` path that is hooked.
    """

    name: str
    kind: str
    module_path: str
    layer: int | None = None


class SiteError(ValueError):
    """A site name that does not resolve on this model."""


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, ModuleList)`` of the model's transformer blocks.

    The stack of blocks is the ``ModuleList`` of at least two modules of one class holding the most
    parameters. This finds ``model.layers`` (Llama, Qwen, Gemma), ``transformer.h`` (GPT-2) and
    ``encoder.layer`` (BERT) alike.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            classes = {type(m) for m in module}
            if len(classes) == 1:
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, path, module)
    if best is None:
        raise SiteError(f"{type(model).__name__} has no stack of transformer blocks; name sites by module path")
    return best[1], best[2]


def _child(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        if _get(block, name) is not None:
            return name
    return None


def resolve(model: nn.Module, name: str) -> Site:
    """Resolve one site name on ``model``; raise :class:`SiteError` naming what exists if it does not."""
    match = SITE_RE.match(name)
    if match:
        layer, what = int(match.group(1)), match.group(2)
        path, blocks = find_blocks(model)
        if layer >= len(blocks):
            raise SiteError(f"site {name!r}: model has {len(blocks)} layers (0..{len(blocks) - 1})")
        if what == "resid":
            return Site(name, "resid", f"{path}.{layer}", layer)
        child = _child(blocks[layer], _ATTN_CHILD if what == "attn" else _MLP_CHILD)
        if child is None:
            raise SiteError(f"site {name!r}: no {what} module found in {type(blocks[layer]).__name__}")
        return Site(name, what if what == "attn" else "resid", f"{path}.{layer}.{child}", layer)
    if name in ("embed", "final"):
        for path in _EMBED if name == "embed" else _FINAL:
            if _get(model, path) is not None:
                return Site(name, "resid", path)
        raise SiteError(f"site {name!r} not found on {type(model).__name__}; name it by module path")
    if name and _get(model, name) is not None:
        return Site(name, "resid", name)
    raise SiteError(
        f"unknown site {name!r}: use layers.N.resid|attn|mlp, embed, final or a module path "
        f"(`latentwatch sites MODEL` lists them)"
    )


def available(model: nn.Module) -> list[Site]:
    """Every readable site of ``model``, in forward order."""
    _, blocks = find_blocks(model)
    sites: list[Site] = []
    for name in ["embed"]:
        with contextlib.suppress(SiteError):
            sites.append(resolve(model, name))
    for i in range(len(blocks)):
        for what in ("attn", "mlp", "resid"):
            with contextlib.suppress(SiteError):
                sites.append(resolve(model, f"layers.{i}.{what}"))
    with contextlib.suppress(SiteError):
        sites.append(resolve(model, "final"))
    return sites


def default_sites(model: nn.Module) -> list[str]:
    """A small default set: the residual stream at one third, two thirds and the last block.

    Attention sites are opt-in because their statistics cost more (see docs/attention.md).
    """
    _, blocks = find_blocks(model)
    n = len(blocks)
    layers = sorted({max(0, round(n / 3) - 1), max(0, round(2 * n / 3) - 1), n - 1})
    return [f"layers.{i}.resid" for i in layers]
