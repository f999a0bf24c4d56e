"""generate() yields exactly one record per request, equal to the record of the prompt's own forward.

On every decoder family available here: SmolLM2 (Llama architecture, real weights) and tiny random
GPT-2, Qwen3, Gemma and Mistral models built from configs (as in test_architectures.py); greedy,
sampling, left-padded batches, and prompts that generate() copies (``num_return_sequences``, beams).
The BERT encoder (MiniLM) is checked on a plain padded forward. Decode steps are recognised from the
cache the forward is handed, whatever transformers calls the argument (``past_key_values`` up to 5.x,
``cache`` in later releases), so these tests are what ``make test-compat`` runs on both ends of the
supported transformers range.
"""

from __future__ import annotations

import pytest
import torch

from collectors import QueueSink, Tap
from collectors.signature import align_mask, pool_activations
from tests.conftest import TEXTS, encode
from tests.test_architectures import build

FAMILIES = ["gpt2", "qwen3", "gemma", "mistral"]
TINY_SITES = ["layers.1.resid", "layers.1.attn", "layers.2.resid"]
SMOLLM2_SITES = ["layers.9.resid", "layers.9.attn"]
NEW_TOKENS = 4


def tiny(kind: str) -> torch.nn.Module:
    """A tiny random decoder of ``kind`` whose generate() always runs NEW_TOKENS decode steps."""
    torch.manual_seed(0)
    model, _, _ = build(kind)
    model.eval()
    model.config._attn_implementation = "sdpa"
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, None  # no early stop: every step decodes
    return model


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A left-padded batch of random prompts of ``lengths`` (token ids 3..127, pad 0) and the prompts alone."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask, prompts


def tapped(model: torch.nn.Module, sites: list[str], call, keys: list[str] | None = None):
    """Run ``call()`` under a tap sampling everything; return its records and stats."""
    sink = QueueSink()
    with Tap(model, sites, sink=sink, sample_rate=1.0) as tap, torch.no_grad():
        with tap.request(keys=keys):
            call()
        assert tap.flush()
    assert tap.stats.hook_errors == tap.stats.worker_errors == tap.stats.sink_errors == 0
    return sink.drain(), tap.stats


def assert_same_signature(got, want) -> None:
    assert got.n_tokens == want.n_tokens
    assert set(got.sites) == set(want.sites)
    for site, arrays in want.sites.items():
        for name, arr in arrays.items():
            assert got.sites[site][name] == pytest.approx(arr, rel=1e-4, abs=1e-4), (site, name)


def alone(model: torch.nn.Module, sites: list[str], prompt: torch.Tensor):
    """The record of one prompt's own plain forward (no padding, no cache)."""
    recs, _ = tapped(model, sites, lambda: model(input_ids=prompt[None]))
    assert len(recs) == 1
    return recs[0]


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
}


@pytest.mark.parametrize("mode", list(GENERATE_MODES))
@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_generate_left_padded_batch_one_record_per_request(kind, mode):
    model = tiny(kind)
    ids, mask, prompts = left_padded([9, 5, 7])
    keys = ["a", "b", "c"]
    torch.manual_seed(2)
    recs, stats = tapped(model, TINY_SITES, lambda: model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **GENERATE_MODES[mode]), keys)
    assert stats.forwards == NEW_TOKENS  # the prefill produces the first new token, each decode step one more
    assert stats.decode_steps_skipped == NEW_TOKENS - 1
    assert stats.requests_seen == len(prompts)
    assert len(recs) == len(prompts)
    for rec, prompt in zip(recs, prompts, strict=True):
        assert rec.n_tokens == len(prompt)
        assert_same_signature(rec, alone(model, TINY_SITES, prompt))


@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_generate_single_prompt_one_record(kind):
    model = tiny(kind)
    _, _, (prompt,) = left_padded([8], seed=3)
    recs, stats = tapped(model, TINY_SITES, lambda: model.generate(
        input_ids=prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False))
    assert stats.decode_steps_skipped == stats.forwards - 1 == NEW_TOKENS - 1
    assert len(recs) == 1
    assert_same_signature(recs[0], alone(model, TINY_SITES, prompt))


@pytest.mark.parametrize("expand", [dict(do_sample=True, num_return_sequences=3), dict(num_beams=2)])
def test_generate_copies_of_a_prompt_are_one_request(expand):
    """num_return_sequences and beam search copy each prompt before the prefill: still one record per key."""
    model = tiny("qwen3")
    ids, mask, prompts = left_padded([6, 9], seed=4)
    recs, stats = tapped(model, TINY_SITES, lambda: model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **expand), ["x", "y"])
    assert stats.requests_seen == 2
    assert len(recs) == 2
    for rec, prompt in zip(recs, prompts, strict=True):
        assert_same_signature(rec, alone(model, TINY_SITES, prompt))


def test_a_forward_that_continues_a_cache_is_not_a_request():
    """A forward handed a non-empty cache reads no new prompt; the same tokens with an empty cache are one.

    The cache goes in by position (GPT-2's second parameter, whatever its name in this transformers)."""
    from transformers import DynamicCache

    model = tiny("gpt2")
    _, _, (prompt,) = left_padded([6], seed=5)
    with torch.no_grad():
        cache = model(prompt[None], use_cache=True).past_key_values
    assert cache.get_seq_length() == 6
    more = torch.tensor([[5, 6, 7]])
    recs, stats = tapped(model, TINY_SITES, lambda: model(more, cache, use_cache=True))
    assert (len(recs), stats.decode_steps_skipped) == (0, 1)
    recs, stats = tapped(model, TINY_SITES, lambda: model(more, DynamicCache(), use_cache=True))
    assert (len(recs), stats.decode_steps_skipped) == (1, 0)


def test_pooling_aligns_a_mask_of_cache_plus_input():
    """The worker gets the mask of cache + input for a forward that continues a cache: its own tokens
    are the last columns (this was the IndexError of a padded generate() batch)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 1, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pooled = pool_activations(hidden, mask)
    torch.testing.assert_close(pooled["last"], hidden[:, 0])
    torch.testing.assert_close(pooled["mean"], hidden[:, 0])
    assert align_mask(mask, 2).tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="covers 5 tokens"):
        align_mask(mask, 6)


# ---------------------------------------------------------------- real weights


@pytest.mark.parametrize("mode", list(GENERATE_MODES))
def test_smollm2_generate_left_padded_batch_one_record_per_request(smollm2, mode):
    texts = TEXTS[:3]
    batch = encode(smollm2, texts, "left")
    batch.pop("position_ids")  # generate() derives them from the mask
    keys = [f"req-{i}" for i in range(len(texts))]
    torch.manual_seed(0)
    recs, stats = tapped(smollm2.model, SMOLLM2_SITES, lambda: smollm2.model.generate(
        **batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **GENERATE_MODES[mode]), keys)
    assert stats.decode_steps_skipped == stats.forwards - 1 == NEW_TOKENS - 1
    assert len(recs) == len(texts)
    for rec, text in zip(recs, texts, strict=True):
        want, _ = tapped(smollm2.model, SMOLLM2_SITES, lambda t=text: smollm2.model(**encode(smollm2, [t])))
        assert_same_signature(rec, want[0])


def test_encoder_plain_forward_one_record_per_request(minilm):
    sites = ["layers.2.attn", "layers.5.resid"]
    recs, stats = tapped(minilm.model, sites, lambda: minilm.model(**encode(minilm, TEXTS, "right")))
    assert stats.decode_steps_skipped == 0
    assert len(recs) == len(TEXTS)
    for rec, text in zip(recs, TEXTS, strict=True):
        want, _ = tapped(minilm.model, sites, lambda t=text: minilm.model(**encode(minilm, [t])))
        assert_same_signature(rec, want[0])
