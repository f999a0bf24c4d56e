"""Per-head attention statistics without running every request on the slow eager path.

Fast attention kernels (SDPA, FlashAttention) never materialise the attention matrix, so
``output_attentions=True`` cannot be used in production. Instead latentwatch wraps the model's own
attention function through ``transformers``' ``AttentionInterface``: the wrapper calls the original
kernel unchanged and, only for the rows of a batch that were sampled, keeps a copy of the *post-RoPE*
queries and keys and the mask the kernel received. The background worker then recomputes
``softmax(q k^T * scaling + mask)`` for those rows and reduces it to four numbers per head
(see :func:`head_statistics`). The recomputation is exact (it is the same arithmetic eager attention
does; the tests compare with eager ``output_attentions`` to 1e-4) and costs O(rows x heads x T^2)
in the worker, never in the forward pass.

The wrapper is registered once per base implementation under ``latentwatch+<base>`` (and the base's
mask function under the same name, so masks are built exactly as before); attaching a tap switches
``config._attn_implementation`` to it and detaching switches it back.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from collectors.record import STAT_NAMES  # noqa: F401  (the order head_statistics returns)

PREFIX = "latentwatch+"

# attention module -> callback(module, query, key, attention_mask, kwargs); set by taps.
_OBSERVERS: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()


@dataclass
class AttentionCapture:
    """Queries, keys and mask of the sampled rows of one attention call (copied, detached)."""

    query: torch.Tensor  # [rows, heads, Tq, d]
    key: torch.Tensor  # [rows, kv_heads, Tk, d]
    mask: torch.Tensor | None  # [rows or 1, 1 or heads, Tq, Tk], bool (True = attend) or additive float
    scaling: float
    softcap: float | None
    is_causal: bool


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        # "eager" is each model's own function, defined beside the attention module.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str) -> Callable:
    def latentwatch_attention(module, query, key, value, attention_mask, *args, **kwargs):
        out = _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        observer = _OBSERVERS.get(module)
        if observer is not None:
            observer(module, query, key, attention_mask, kwargs)  # never raises (see Tap)
        return out

    latentwatch_attention.__name__ = f"latentwatch_{base}_attention"
    return latentwatch_attention


def wrapped_name(base: str) -> str:
    """Register (once) and return the name of the observing wrapper around attention ``base``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(name, _make_wrapper(base))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
        if mask_fn is not None:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
    return name


def capture(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
    rows: torch.Tensor,
) -> AttentionCapture:
    """Copy what :func:`probabilities` needs for ``rows`` of one attention call."""
    mask = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.shape[0] == 1 else attention_mask.index_select(0, rows)
        mask = mask.detach().clone()
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    return AttentionCapture(
        query=query.detach().index_select(0, rows).clone(),
        key=key.detach().index_select(0, rows).clone(),
        mask=mask,
        scaling=float(scaling),
        softcap=kwargs.get("softcap"),
        is_causal=is_causal,
    )


def probabilities(cap: AttentionCapture, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Recompute attention probabilities ``[rows, heads, Tq, Tk]`` in fp32 from a capture.

    ``key_mask`` (``[rows, Tk]``, 1 = real token) is applied in addition to the captured mask; it
    matters when the kernel got no mask (no padding in the batch, causal flag only).
    """
    q = cap.query.float()
    k = cap.key.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * cap.scaling
    if cap.softcap is not None:
        scores = torch.tanh(scores / cap.softcap) * cap.softcap
    tq, tk = scores.shape[-2:]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=scores.device)
    if cap.mask is not None:
        m = cap.mask[..., :tk]
        allowed = m if m.dtype == torch.bool else None
        if allowed is None:
            scores = scores + m.float()
            allowed = torch.isfinite(m) & (m > torch.finfo(torch.float32).min / 2)
    elif cap.is_causal and tq > 1:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :tk]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # rows with no allowed key (padding queries) -> zeros


def head_statistics(
    probs: torch.Tensor, query_mask: torch.Tensor, first_index: torch.Tensor, query_offset: int = 0
) -> torch.Tensor:
    """Reduce probabilities ``[rows, heads, Tq, Tk]`` to ``[rows, heads, 4]`` statistics.

    Per head, averaged over the request's real query tokens:

    * ``entropy`` -- Shannon entropy (nats) of each query's attention distribution;
    * ``first_token_mass`` -- weight on the request's first real token (the "attention sink");
    * ``mean_distance`` -- expected ``|i - j|`` between query and attended key, in tokens;
    * ``max_weight`` -- the largest single weight (how peaked attention is).

    ``query_mask`` is ``[rows, Tq]`` (1 = real token), ``first_index`` ``[rows]`` the key index of the
    first real token, ``query_offset`` the key index of query 0 (non-zero only with a KV cache).
    """
    rows, _, tq, tk = probs.shape
    p = probs.clamp_min(0)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    idx = first_index.view(rows, 1, 1, 1).expand(rows, p.shape[1], tq, 1)
    first = p.gather(-1, idx).squeeze(-1)
    qpos = torch.arange(tq, device=p.device, dtype=p.dtype) + query_offset
    kpos = torch.arange(tk, device=p.device, dtype=p.dtype)
    distance = (p * (qpos[:, None] - kpos[None, :]).abs()).sum(-1)
    peak = p.amax(-1)
    stats = torch.stack([entropy, first, distance, peak], dim=-1)  # [rows, heads, Tq, 4]
    w = query_mask.to(p.dtype)[:, None, :, None]
    return (stats * w).sum(2) / w.sum(2).clamp_min(1)
