"""The tap never blocks or breaks serving, and leaves no trace when detached."""

from __future__ import annotations

import threading

import pytest
import torch

from collectors import QueueSink, Sampler, SiteError, Tap, attention
from tests.conftest import TEXTS, encode


class BlockingSink:
    """A sink stuck until released: stands for a slow disk or network."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.records = []

    def write(self, record) -> None:
        self.entered.set()
        self.release.wait(60)
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FailingSink(BlockingSink):
    def write(self, record) -> None:
        raise OSError("disk full")


def test_full_queue_drops_and_counts_without_blocking(smollm2):
    batch = encode(smollm2, TEXTS[:2])
    sink = BlockingSink()
    tap = Tap(smollm2.model, ["layers.5.resid"], sink=sink, sample_rate=1.0, queue_size=1).attach()
    try:
        with torch.no_grad():
            smollm2.model(**batch)  # taken by the worker, which then blocks in the sink
            assert sink.entered.wait(30)
            for _ in range(4):  # 1 fits the queue, 3 must be dropped -- while the sink is still blocked
                smollm2.model(**batch)
        assert not sink.release.is_set()  # every forward above returned with the sink stuck
        assert tap.stats.dropped_queue_full == 3 * 2
        assert tap.stats.requests_sampled == 2 * 2
    finally:
        sink.release.set()
        tap.detach()
    assert len(sink.records) == 4
    assert tap.stats.records_emitted == 4


def test_failing_hook_and_sink_do_not_break_the_forward(smollm2, monkeypatch):
    batch = encode(smollm2, TEXTS)
    with torch.no_grad():
        want = smollm2.model(**batch).logits

    def boom(*args, **kwargs):
        raise RuntimeError("bug in the tap")

    monkeypatch.setattr(attention, "capture", boom)
    tap = Tap(smollm2.model, ["layers.4.attn", "layers.4.resid"], sink=FailingSink(), sample_rate=1.0)
    with tap, torch.no_grad():
        got = smollm2.model(**batch).logits
        tap.flush()
    assert torch.equal(got, want)
    assert tap.stats.hook_errors == 1
    assert tap.stats.sink_errors == len(TEXTS)
    assert tap.stats.records_emitted == 0


def test_detach_restores_the_model_exactly(smollm2):
    model = smollm2.model
    batch = encode(smollm2, TEXTS, "left")
    with torch.no_grad():
        before = model(**batch).logits
    impl = model.config._attn_implementation

    def hooks():  # transformers installs hooks of its own (output capturing) once used: compare with those
        return [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]

    hooks_before = hooks()
    sink = QueueSink()
    with Tap(model, ["layers.1.attn", "layers.7.resid", "layers.7.mlp", "embed", "final"], sink=sink,
             sample_rate=1.0) as tap, torch.no_grad():
        during = model(**batch).logits
        assert model.config._attn_implementation == attention.PREFIX + impl
        tap.flush()
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, during)  # observing does not change what the model computes
    assert torch.equal(before, after)
    assert model.config._attn_implementation == impl
    assert hooks() == hooks_before
    assert not any(m in attention._OBSERVERS for m in model.modules())
    assert len(sink.drain()) == len(TEXTS)


def test_sampling_is_deterministic_on_the_request_key(smollm2):
    batch = encode(smollm2, TEXTS)
    keys = [f"req-{i}" for i in range(len(TEXTS))]
    sampler = Sampler(0.5, b"salt-for-tests")
    expected = [sampler.hashed_key(k) for k in keys if sampler.sampled(k)]
    got = []
    for _ in range(2):
        sink = QueueSink()
        with Tap(smollm2.model, ["layers.2.resid"], sink=sink, sample_rate=0.5, salt=b"salt-for-tests") as tap:
            with tap.request(keys=keys), torch.no_grad():
                smollm2.model(**batch)
            tap.flush()
        got.append([r.key for r in sink.drain()])
    assert got[0] == got[1] == expected


def test_sample_rate_is_met():
    n = 20_000
    for rate in (0.0, 0.01, 0.1, 0.5, 1.0):
        s = Sampler(rate, b"salt-for-tests")
        hits = sum(s.sampled(f"k{i}") for i in range(n))
        sd = (n * rate * (1 - rate)) ** 0.5
        assert abs(hits - n * rate) <= 5 * sd + 1e-9, (rate, hits)
    with pytest.raises(ValueError):
        Sampler(1.5, b"salt-for-tests")


def test_zero_rate_captures_nothing(smollm2):
    sink = QueueSink()
    with Tap(smollm2.model, ["layers.2.resid"], sink=sink, sample_rate=0.0) as tap, torch.no_grad():
        smollm2.model(**encode(smollm2, TEXTS))
        tap.flush()
    assert tap.stats.requests_seen == len(TEXTS)
    assert tap.stats.requests_sampled == 0
    assert len(sink) == 0


def test_text_stays_in_process_unless_enabled(smollm2):
    batch = encode(smollm2, TEXTS[:2])
    for keep in (False, True):
        sink = QueueSink()
        with Tap(smollm2.model, ["layers.2.resid"], sink=sink, sample_rate=1.0, keep_text=keep) as tap:
            with tap.request(keys=["a", "b"], texts=TEXTS[:2],
                             metadata={"route": "/chat", "Bad Key": "x", "user_id": "u" * 500}), torch.no_grad():
                smollm2.model(**batch)
            tap.flush()
        recs = sink.drain()
        assert [r.text for r in recs] == (TEXTS[:2] if keep else [None, None])
        assert all(r.meta["route"] == "/chat" and "Bad Key" not in r.meta and "user_id" not in r.meta for r in recs)
        assert all(r.meta["tap_sampled"] == "2" and r.meta["tap_dropped"] == "0" for r in recs)
        assert all(r.key not in ("a", "b") and len(r.key) == 32 for r in recs)
        assert tap.stats.metadata_rejected == 2


def test_plain_module_by_path():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 6, 4)  # [batch, tokens, features]
    sink = QueueSink()
    with Tap(net, ["1"], sink=sink, sample_rate=1.0) as tap, torch.no_grad():
        net(x)
        tap.flush()
    recs = sink.drain()
    assert len(recs) == 5
    with torch.no_grad():
        want = torch.relu(net[0](x)).mean(1)
    assert recs[2].sites["1"]["mean"] == pytest.approx(want[2].numpy(), abs=1e-6)
    with pytest.raises(SiteError, match="no stack of transformer blocks"):
        Tap(net, ["layers.0.attn"], sink=sink)


def test_unknown_sites_are_refused_with_a_clear_message(smollm2):
    with pytest.raises(SiteError, match="30 layers"):
        Tap(smollm2.model, ["layers.30.resid"], sink=QueueSink())
    with pytest.raises(SiteError, match="unknown site"):
        Tap(smollm2.model, ["nonsense"], sink=QueueSink())
