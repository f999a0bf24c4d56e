"""Site names and attention statistics on other architectures (tiny random weights, built from configs).

No weights are downloaded: each model is built with ``from_config`` and random initialisation, which is
enough to check that sites resolve and that the recomputed attention statistics equal eager attention's.
"""

from __future__ import annotations

import pytest
import torch

from collectors import QueueSink, Tap
from collectors.attention import head_statistics
from collectors.signature import first_last_index
from collectors.sites import available, resolve

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def build(kind: str):
    import transformers as tf

    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg), "transformer.h.1", "transformer.h.1.attn"
    if kind == "qwen3":  # grouped-query attention with q/k norms applied before RoPE
        cfg = tf.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16)
        return tf.Qwen3ForCausalLM(cfg), "model.layers.1", "model.layers.1.self_attn"
    if kind == "gemma":
        cfg = tf.GemmaConfig(**TINY, num_key_value_heads=1, head_dim=16)
        return tf.GemmaForCausalLM(cfg), "model.layers.1", "model.layers.1.self_attn"
    if kind == "mistral":
        cfg = tf.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=4)
        return tf.MistralForCausalLM(cfg), "model.layers.1", "model.layers.1.self_attn"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gpt2", "qwen3", "gemma", "mistral"])
def test_sites_and_attention_statistics(kind):
    torch.manual_seed(0)
    model, block, attn = build(kind)
    model.eval()
    model.config._attn_implementation = "sdpa"
    assert resolve(model, "layers.1.resid").module_path == block
    assert resolve(model, "layers.1.attn").module_path == attn
    assert {"embed", "final", "layers.2.mlp"} <= {s.name for s in available(model)}
    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    sink = QueueSink()
    with Tap(model, ["layers.1.resid", "layers.1.attn"], sink=sink, sample_rate=1.0) as tap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
        tap.flush()
    assert tap.stats.hook_errors == tap.stats.worker_errors == 0
    recs = sink.drain()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions[1]
    model.config._attn_implementation = "sdpa"
    first, _ = first_last_index(mask)
    want = head_statistics(probs.float(), mask, first)
    for i, rec in enumerate(recs):
        torch.testing.assert_close(torch.from_numpy(rec.sites["layers.1.attn"]["heads"]), want[i], atol=1e-4, rtol=0)
