"""Signatures from real models equal references computed by transformers itself."""

from __future__ import annotations

import pytest
import torch

from collectors import QueueSink, Tap
from collectors.attention import head_statistics
from collectors.signature import WINDOW, first_last_index, windowed_max
from tests.conftest import TEXTS, encode


def _run(lm, sites, batch, **tap_kwargs):
    sink = QueueSink()
    with Tap(lm.model, sites, sink=sink, sample_rate=1.0, **tap_kwargs) as tap, torch.no_grad():
        out = lm.model(**batch)
        assert tap.flush()
        assert tap.stats.hook_errors == tap.stats.worker_errors == tap.stats.sink_errors == 0
    return out, sink.drain()


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooled_vectors_match_hidden_states(smollm2, side):
    batch = encode(smollm2, TEXTS, side)
    _, recs = _run(smollm2, ["layers.3.resid", "layers.17.resid"], batch)
    with torch.no_grad():
        ref = smollm2.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    _, last = first_last_index(mask)
    assert len(recs) == len(TEXTS)
    for i, rec in enumerate(recs):
        assert rec.n_tokens == int(mask[i].sum())
        for layer in (3, 17):
            h = ref[layer + 1][i]  # hidden_states[0] is the embedding output
            m = mask[i].bool()
            want_mean = h[m].mean(0).numpy()
            got = rec.sites[f"layers.{layer}.resid"]
            assert got["mean"] == pytest.approx(want_mean, rel=1e-5, abs=1e-4)
            assert got["last"] == pytest.approx(h[last[i]].numpy(), rel=1e-5, abs=1e-4)
            assert got["norm"][0] == pytest.approx(h[m].norm(dim=-1).mean().item(), rel=1e-5)
            assert got["wmax"] == pytest.approx(_rolling_max(h[m], WINDOW).numpy(), rel=1e-5, abs=1e-4)


def _rolling_max(x: torch.Tensor, window: int) -> torch.Tensor:
    if len(x) < window:
        return x.mean(0)
    return torch.stack([x[j:j + window].mean(0) for j in range(len(x) - window + 1)]).amax(0)


def test_windowed_max_on_short_long_and_padded_rows():
    torch.manual_seed(0)
    h = torch.randn(4, 12, 6) * 50
    mask = torch.zeros(4, 12)
    mask[0] = 1              # longer than the window, no padding
    mask[1, :5] = 1          # shorter than the window, right padding: one window, the mean
    mask[2, 3:] = 1          # left padding
    mask[3, 4:12] = 1        # exactly one window
    got = windowed_max(h, mask, 8)
    for i in range(4):
        m = mask[i].bool()
        torch.testing.assert_close(got[i], _rolling_max(h[i][m], 8), atol=1e-4, rtol=1e-5)
    assert torch.equal(windowed_max(h, torch.zeros(4, 12), 8), torch.zeros(4, 6))  # nothing real: zeros
    # the windowed max keeps a short span a long mean dilutes
    spike = torch.zeros(1, 100, 1)
    spike[0, 40:48] = 1.0
    pooled = windowed_max(spike, torch.ones(1, 100), 8)
    assert pooled.item() == pytest.approx(1.0) and spike.mean().item() == pytest.approx(0.08)


def _eager_reference(lm, batch, layer):
    """Head statistics from eager attention's own output_attentions probabilities."""
    config = lm.model.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            probs = lm.model(**batch, output_attentions=True).attentions[layer]
    finally:
        config._attn_implementation = saved
    mask = batch["attention_mask"]
    first, _ = first_last_index(mask)
    return head_statistics(probs.float(), mask, first)


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_statistics_match_eager(smollm2, side):
    batch = encode(smollm2, TEXTS, side)
    assert smollm2.model.config._attn_implementation == "sdpa"
    _, recs = _run(smollm2, ["layers.0.attn", "layers.12.attn"], batch)
    for layer in (0, 12):
        want = _eager_reference(smollm2, batch, layer)
        for i, rec in enumerate(recs):
            got = torch.from_numpy(rec.sites[f"layers.{layer}.attn"]["heads"])
            assert got.shape == (9, 4)
            torch.testing.assert_close(got, want[i], atol=1e-4, rtol=0)


def test_encoder_attention_statistics_match_eager(minilm):
    batch = encode(minilm, TEXTS, "right")
    _, recs = _run(minilm, ["layers.2.attn", "layers.5.resid"], batch)
    want = _eager_reference(minilm, batch, 2)
    for i, rec in enumerate(recs):
        got = torch.from_numpy(rec.sites["layers.2.attn"]["heads"])
        assert got.shape == (12, 4)
        torch.testing.assert_close(got, want[i], atol=1e-4, rtol=0)
        assert rec.sites["layers.5.resid"]["mean"].shape == (384,)


LONG = ("The committee met on Tuesday to review the budget for next year, and after a long discussion about "
        "roads, schools and the new library it agreed to postpone the vote until the spring session.")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", [0, 1])  # shorter than the wmax window; longer than it, padded to LONG
def test_same_text_alone_and_in_padded_batch(smollm2, side, which):
    sites = ["layers.9.resid", "layers.9.attn", "layers.29.resid"]
    text = TEXTS[which]  # gets padded
    _, alone = _run(smollm2, sites, encode(smollm2, [text]))
    _, batched = _run(smollm2, sites, encode(smollm2, [*TEXTS, LONG], side))
    a, b = alone[0], batched[which]
    assert a.n_tokens == b.n_tokens
    for site in sites:
        for name, arr in a.sites[site].items():
            assert b.sites[site][name] == pytest.approx(arr, rel=1e-4, abs=1e-4), (site, name)


def test_generate_yields_one_record_of_the_prompt(smollm2):
    batch = encode(smollm2, [TEXTS[2]])
    batch.pop("position_ids")
    sink = QueueSink()
    with Tap(smollm2.model, ["layers.9.resid", "layers.9.attn"], sink=sink, sample_rate=1.0) as tap:
        with torch.no_grad():
            smollm2.model.generate(**batch, max_new_tokens=5, do_sample=False)
        tap.flush()
        assert tap.stats.forwards >= 5
        assert tap.stats.decode_steps_skipped == tap.stats.forwards - 1
    gen = sink.drain()
    _, prompt_only = _run(smollm2, ["layers.9.resid", "layers.9.attn"], batch)
    assert len(gen) == 1
    assert gen[0].n_tokens == int(batch["attention_mask"].sum())
    for site in ("layers.9.resid", "layers.9.attn"):
        for name, arr in prompt_only[0].sites[site].items():
            assert gen[0].sites[site][name] == pytest.approx(arr, rel=1e-4, abs=1e-4)
