"""The vLLM plugin's parts that need no vLLM: configuration, request keys, chunk bookkeeping."""

from __future__ import annotations

import pytest
import torch

from collectors.vllm import settings as vs
from collectors.vllm.tap import _Pending, request_key


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("LATENTWATCH_VLLM_CONFIG", "LATENTWATCH_VLLM_SINK", "LATENTWATCH_VLLM_SITES",
              "LATENTWATCH_VLLM_SAMPLE_RATE", "LATENTWATCH_VLLM_KEY"):
        monkeypatch.delenv(k, raising=False)


def test_not_configured_means_the_plugin_does_nothing():
    assert not vs.configured()


def test_file_and_environment_environment_wins(tmp_path, monkeypatch):
    cfg = tmp_path / "tap.yaml"
    cfg.write_text("sink: file:/data/live.lwsr\nsample_rate: 0.2\nsites: [layers.9.resid]\n")
    monkeypatch.setenv("LATENTWATCH_VLLM_CONFIG", str(cfg))
    monkeypatch.setenv("LATENTWATCH_VLLM_SAMPLE_RATE", "0.05")
    monkeypatch.setenv("LATENTWATCH_VLLM_SITES", "layers.3.resid, layers.19.attn")
    assert vs.configured()
    s = vs.load_settings()
    assert s.sink == "file:/data/live.lwsr" and s.sample_rate == 0.05
    assert s.sites == ["layers.3.resid", "layers.19.attn"]


@pytest.mark.parametrize("text, field", [
    ("sink: s3://bucket\n", "sink"),
    ("sink: file:/x\nsample_rate: 2\n", "sample_rate"),
    ("sink: file:/x\ncapture: magic\n", "capture"),
    ("sink: file:/x\nunknown_field: 1\n", "unknown_field"),
    ("sink: kafka\n", "kafka"),
])
def test_bad_configuration_is_one_line_naming_the_field(tmp_path, text, field):
    cfg = tmp_path / "tap.yaml"
    cfg.write_text(text)
    with pytest.raises(vs.VllmTapConfigError) as err:
        vs.load_settings(cfg)
    assert field in str(err.value) and str(cfg) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_configuration(tmp_path):
    with pytest.raises(vs.VllmTapConfigError, match="cannot read"):
        vs.load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(vs.VllmTapConfigError, match="mapping"):
        vs.load_settings(bad)


def test_request_key_drops_vllms_random_suffix_only():
    assert request_key("cmpl-abc-0-1a2b3c4d") == "cmpl-abc-0"
    assert request_key("chatcmpl-xyz") == "chatcmpl-xyz"
    assert request_key("req-12-XYZ12345") == "req-12-XYZ12345"  # not vLLM's lowercase hex suffix


def test_pending_cut_keeps_exactly_the_positions_before():
    p = _Pending(key="k", prompt_len=10, ts=0.0)
    p.acts["s"] = [torch.arange(4.0)[:, None], torch.arange(4.0, 8.0)[:, None]]
    p.q["a"] = [torch.zeros(4, 2, 3), torch.ones(4, 2, 3)]
    p.next_pos = 8
    p.cut(6)  # a preempted request recomputed from position 6
    assert p.next_pos == 6
    assert torch.cat(p.acts["s"])[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.cat(p.q["a"]).shape[0] == 6
    p.cut(0)
    assert p.acts["s"] == [] and p.next_pos == 0


def test_counter_folder_must_be_this_users_alone(tmp_path):
    import pytest

    from collectors.vllm.private import make_private_folder, private_folder

    folder = tmp_path / "counters"
    make_private_folder(folder)
    assert private_folder(folder) and (folder.stat().st_mode & 0o777) == 0o700
    folder.chmod(0o777)  # another user could plant counter files here
    assert not private_folder(folder)
    with pytest.raises(OSError, match="writable by others"):
        make_private_folder(folder)
    assert not private_folder(tmp_path / "missing")
