"""``latentwatch explain`` on real weights, against a shift whose cause is known: one attention head of
SmolLM2 made eight times louder. Ablating the components near the alarmed site must find that head."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from collectors.sites import default_sites, find_blocks
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.cli import app
from monitor.ops.explain import ExplainError, ablated, components_near, explain
from monitor.probes import corpora
from monitor.probes.activations import cached_records

LAYER, HEAD, LENGTH = 8, 4, 32
DETECTOR = "meanshift_full:layers.9.resid"  # reads the site right after the loud head


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    texts = [t.text for t in corpora.sample(corpora.dialog("english"), 120, seed=3)
             + corpora.sample(corpora.tweets(), 120, seed=3)]
    sites = default_sites(smollm2.model)
    reference = cached_records(smollm2, texts[:200], sites, "explain-test", max_length=LENGTH, progress=False)
    config = AnalyzerConfig(window=20, stride=5, false_alarm_every=2000, univariate=["ks"],
                            multivariate=["meanshift_full", "meanshift"], concept_rates=False)
    baseline = Baseline.build(reference, None, config)
    path = tmp_path_factory.mktemp("explain") / "baseline.safetensors"
    baseline.save(path)
    return baseline, path, texts[200:220]


@pytest.fixture()
def loud_head(smollm2):
    """Head HEAD of layer LAYER eight times louder: a shift in the model's internals with a known cause."""
    _, blocks = find_blocks(smollm2.model)
    d = smollm2.model.config.head_dim

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., HEAD * d:(HEAD + 1) * d] *= 8.0
        return (x, *args[1:])

    handle = blocks[LAYER].self_attn.o_proj.register_forward_pre_hook(pre_hook)
    yield
    handle.remove()


def test_explain_finds_the_head_that_was_made_loud(smollm2, setup, loud_head):
    baseline, _, window = setup
    result = explain(smollm2, window, baseline, None, detector=DETECTOR, max_length=LENGTH)
    assert result["in_alarm"] and result["ratio"] > 2
    assert result["singles"][0]["component"] == f"layers.{LAYER}.attn head {HEAD}"
    assert result["singles"][0]["ratio"] < 1.0 and f"layers.{LAYER}.attn head {HEAD}" in result["restoring"]
    assert result["components_tried"] == len(components_near(smollm2.model, 9)) == 30
    assert result["forward_passes"] <= result["budget"] and result["pairs"] and result["statistic_moved"]


def test_explain_keeps_to_its_budget_and_leaves_the_model_as_it_was(smollm2, setup):
    baseline, _, window = setup
    result = explain(smollm2, window, baseline, None, detector=DETECTOR, max_length=LENGTH,
                     budget=20 * 6)
    assert result["forward_passes"] <= 120 and result["components_tried"] == 5 and not result["pairs"]
    enc = smollm2.tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        before = smollm2.model(**enc).logits
        with ablated(smollm2.model, components_near(smollm2.model, 9)[:3]):
            during = smollm2.model(**enc).logits
        after = smollm2.model(**enc).logits
    assert not torch.equal(before, during) and torch.equal(before, after)


def test_explain_refuses_too_few_texts_and_unknown_detectors(smollm2, setup):
    baseline, _, window = setup
    with pytest.raises(ExplainError, match="window is 20"):
        explain(smollm2, window[:5], baseline, None)
    with pytest.raises(ExplainError, match="no detector 'nope'"):
        explain(smollm2, window, baseline, None, detector="nope", budget=100)


def test_explain_cli_prints_json(setup, tmp_path):
    _, path, window = setup
    texts = tmp_path / "window.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in window))
    result = CliRunner().invoke(app, ["explain", str(texts), "--baseline", str(path), "--max-length", str(LENGTH),
                                      "--budget", "100", "--detector", DETECTOR, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout[result.stdout.index("{"):])
    assert body["evidence"]["singles"].startswith("interventional") and body["components_tried"] == 4


def test_explain_on_the_demo_alarm_ablates_around_the_probe_of_the_concept_that_moved(smollm2, demo_run):
    """The demo writes its first alarmed window; a detector on probe scores is explained at the site of the
    probe whose concept moved."""
    from monitor.probes.probe import ProbeSet

    out, result = demo_run
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "alarm-window.jsonl").read_text().splitlines()]
    baseline = Baseline.load(out / "baseline.safetensors")
    probes = ProbeSet.load_dir(out / "probes", fingerprint=baseline.fingerprint)
    assert len(rows) == baseline.config.window and "latentwatch explain" in " ".join(result.output.split())
    got = explain(smollm2, [r["text"] for r in rows], baseline, probes, detector=rows[0]["detector"],
                  max_length=48, budget=baseline.config.window * 4)
    if rows[0]["detector"].endswith(":scores"):
        site = next(p.site for p in probes.probes if p.concept == got["concept"])
        assert got["layers"][-1] == int(site.split(".")[1])
    assert got["components_tried"] == 3 and all("prompt_injection" in r["concept_change"] for r in got["singles"])
