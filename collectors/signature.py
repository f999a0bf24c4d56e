"""Reduce captured activations and attention to a request's signature (runs in the tap's worker).

For an activation site, each sampled request leaves:

* ``mean`` -- mean of the token vectors over the request's real tokens (attention mask = 1);
* ``last`` -- the vector at the last real token (what a causal LM predicts the next token from);
* ``wmax`` -- windowed max: the mean over every run of :data:`WINDOW` consecutive real tokens (a rolling
  mean), then the elementwise max over those windows; a request shorter than the window has one window,
  all of it (so ``wmax`` equals ``mean``). A short span (an injected instruction in a long e-mail) keeps
  its weight here, where ``mean`` dilutes it, without the noise of a per-token max;
* ``norm`` -- ``[mean token L2 norm, last token L2 norm]``.

For an attention site, ``heads`` -- ``[n_heads, 4]``, see :func:`collectors.attention.head_statistics`.
Left and right padding give the same signature as the unpadded request, because every reduction
uses the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from collectors import attention

WINDOW = 8  # real tokens per window of the ``wmax`` pooling

def first_last_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first and last real token of each row of a ``[rows, T]`` 0/1 mask."""
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device)
    m = mask.bool()
    first = torch.where(m, pos, t).amin(1).clamp_max(t - 1)
    last = torch.where(m, pos, -1).amax(1).clamp_min(0)
    return first, last


def align_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The columns of a ``[rows, T']`` mask that belong to the ``tokens`` positions a forward computed.

    A forward that continues a KV cache is handed the mask of cache + input (transformers' convention);
    its own tokens are the last ``tokens`` columns. A mask shorter than the tokens cannot be aligned.
    """
    if mask.shape[1] == tokens:
        return mask
    if mask.shape[1] > tokens:
        return mask[:, -tokens:]
    raise ValueError(f"attention mask covers {mask.shape[1]} tokens but the activations have {tokens}")


def windowed_max(h: torch.Tensor, mask: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """Elementwise max over the rolling means of ``window`` consecutive real tokens: ``[rows, T, d]`` -> ``[rows, d]``.

    Real tokens are contiguous (left or right padding). A window ending at a real token counts when it
    holds ``min(window, n_real)`` real tokens, so a request shorter than the window pools to its mean.
    Window sums are direct sums (``avg_pool1d``), not differences of cumulative sums, which lose
    precision on the residual stream's large activations.
    """
    m = mask.to(h.dtype)
    hm = (h * m[..., None]).transpose(1, 2)  # [rows, d, T]
    # left-pad by window - 1 so output position i is the window of positions (i - window, i]
    sums = F.avg_pool1d(F.pad(hm, (window - 1, 0)), window, stride=1) * window
    counts = F.avg_pool1d(F.pad(m[:, None, :], (window - 1, 0)), window, stride=1)[:, 0] * window  # [rows, T]
    need = m.sum(1, keepdim=True).clamp(min=1, max=window)
    valid = mask.bool() & (counts.round() >= need)
    rolling = sums / counts.clamp_min(1)[:, None, :]
    rolling = rolling.masked_fill(~valid[:, None, :], float("-inf"))
    out = rolling.amax(2)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))  # an all-padding row: zeros, like mean


def pool_activations(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``hidden`` ``[rows, T, d]``, ``mask`` ``[rows, T]`` -> ``{"mean": [rows, d], "last": .., "wmax": ..,
    "norm": [rows, 2]}``.

    A mask longer than ``T`` (cache + input) is aligned to its last ``T`` columns.
    """
    h = hidden.float()
    mask = align_mask(mask, h.shape[1])
    m = mask.to(h.dtype)
    count = m.sum(1, keepdim=True).clamp_min(1)
    mean = (h * m[..., None]).sum(1) / count
    _, last_idx = first_last_index(mask)
    last = h[torch.arange(h.shape[0], device=h.device), last_idx]
    token_norms = h.norm(dim=-1)
    norm = torch.stack([(token_norms * m).sum(1) / count[:, 0], last.norm(dim=-1)], dim=-1)
    return {"mean": mean, "last": last, "wmax": windowed_max(h, mask), "norm": norm}


def attention_heads(cap: attention.AttentionCapture, mask: torch.Tensor) -> torch.Tensor:
    """Per-head statistics ``[rows, heads, 4]`` of one captured attention call over prompt ``mask``."""
    tq = cap.query.shape[2]
    tk = cap.key.shape[2]
    key_mask = align_mask(mask, tk)
    probs = attention.probabilities(cap, key_mask=key_mask)
    first, _ = first_last_index(key_mask)
    query_mask = key_mask[:, -tq:]
    return attention.head_statistics(probs, query_mask, first, query_offset=tk - tq)
