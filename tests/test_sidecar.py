"""The sidecar as a real process on loopback: records in, Prometheus metrics out, clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collectors.sinks import FileSink
from monitor.analysis.baseline import Baseline
from monitor.sidecar.replay import replay
from tests.kafka_broker import free_port
from tests.test_analyzer import CONFIG, FP, make_records, probes

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metrics(port: int) -> dict[str, list]:
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    return {f.name: f for f in text_string_to_metric_families(text)}


def make_artifacts(folder: Path) -> Path:
    """A baseline and its probes in ``folder`` (the test models of tests/test_analyzer.py)."""
    pset = probes()
    (folder / "probes").mkdir()
    for p in pset.probes:
        p.card = {"held_out": {"auroc": 0.9}}
        p.save(folder / "probes" / f"{p.concept}.probe.json")
    Baseline.build(make_records(3000, np.random.default_rng(0)), pset, CONFIG).save(folder / "baseline.safetensors")
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("sidecar"))


TOKEN = "test-token-0123456789abcdef"


def start(artifacts: Path, tmp_path: Path, **overrides) -> tuple[subprocess.Popen, int, Path]:
    """Start ``latentwatch serve``; ``ingest=True`` enables the ingest listener with TOKEN (``ingest_port``)."""
    port = free_port()
    live = tmp_path / "live.lwsr"
    config = {"baseline": str(artifacts / "baseline.safetensors"), "probes": str(artifacts / "probes"),
              "source": {"kind": "file", "path": str(live), "poll_seconds": 0.1}, "port": port, **overrides}
    if config.get("ingest") is True:
        (tmp_path / "token").write_text(TOKEN + "\n")
        config["ingest"] = {"enabled": True, "port": free_port(), "token_file": str(tmp_path / "token")}
    (tmp_path / "sidecar.yaml").write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "-c", str(tmp_path / "sidecar.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200 or proc.poll() is not None, what="readyz")
    assert proc.poll() is None, proc.stderr.read()
    return proc, port, live


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def ingest_port(tmp_path: Path) -> int:
    return json.loads((tmp_path / "sidecar.yaml").read_text())["ingest"]["port"]


def test_metrics_reflect_what_was_fed(artifacts, tmp_path):
    proc, port, live = start(artifacts, tmp_path, ingest=True)
    try:
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        rng = np.random.default_rng(1)
        recs = make_records(400, rng) + make_records(200, rng, concept_shift=2.0)
        for i, r in enumerate(recs):
            r.meta = {"replica": f"pod-{i % 2}", "tap_sampled": str(1000 + i), "tap_dropped": str(i // 100)}
        bad = make_records(3, rng)
        bad[0].sites["layers.2.resid"]["mean"][0] = np.nan
        bad[1].fingerprint = "sha256:another-model"
        bad[2].sites["layers.2.resid"]["mean"] = np.zeros(7, np.float32)
        with FileSink(live) as sink:
            for r in recs[:300] + bad + recs[300:]:
                sink.write(r)
        with live.open("ab") as f:
            f.write(b"LWSR\x01\x00\x00\x00garbage that is not a record" * 3)
        wait_for(lambda: metrics(port)["latentwatch_records_received"].samples[0].value >= 603, what="ingestion")
        m = metrics(port)
        assert m["latentwatch_records_received"].type == "counter"
        assert m["latentwatch_records_received"].samples[0].labels == {"model_name": "m"}
        assert m["latentwatch_records_received"].samples[0].value == 603
        invalid = {s.labels["reason"]: s.value for s in m["latentwatch_records_invalid"].samples
                   if s.name.endswith("_total")}
        assert invalid["nonfinite"] == 1 and invalid["fingerprint"] == 1 and invalid["shape"] == 1
        assert invalid["corrupt"] >= 1
        base = Baseline.load(artifacts / "baseline.safetensors")
        thresholds = {s.labels["detector"]: s.value for s in m["latentwatch_drift_threshold"].samples}
        assert thresholds == {s.name: pytest.approx(s.threshold) for s in base.slots}
        assert m["latentwatch_drift_statistic"].type == "gauge"
        alarms = {s.labels["detector"]: s.value for s in m["latentwatch_drift_alarms"].samples
                  if s.name.endswith("_total")}
        assert alarms["rate:scores"] >= 1  # the concept surge in the last 200 records
        attribution = [s for s in m["latentwatch_drift_attribution"].samples if s.labels["detector"] == "rate:scores"]
        assert attribution and min(attribution, key=lambda s: int(s.labels["rank"])).labels["component"] == "injection"
        hist = m["latentwatch_concept_score"]
        assert hist.type == "histogram"
        count = {s.labels["concept"]: s.value for s in hist.samples if s.name.endswith("_count")}
        assert count == {"injection": 600, "toxicity": 600}
        rates = {s.labels["concept"]: s.value for s in m["latentwatch_concept_ratio"].samples}
        base_rates = {s.labels["concept"]: s.value for s in m["latentwatch_concept_baseline_ratio"].samples}
        assert rates["injection"] > base_rates["injection"] + 0.3
        dropped = {s.labels["replica"]: s.value for s in m["latentwatch_tap_dropped"].samples
                   if s.name.endswith("_total") and s.labels["stage"] == "queue"}
        assert dropped == {"pod-0": 5, "pod-1": 5, "unknown": 0}  # the hand-made bad records name no replica
        info = m["latentwatch_baseline_info"].samples[0].labels
        assert "fingerprint" not in info and info["window"] == str(CONFIG.window)
        assert FP not in get(f"http://127.0.0.1:{port}/metrics")[1]  # nothing that helps forge records
        assert len(m["latentwatch_drift_statistic"].samples) == len(base.slots)  # bounded labels

        # replay: POST /ingest
        path = tmp_path / "replay.lwsr"
        with FileSink(path) as sink:
            for r in make_records(50, rng):
                sink.write(r)
        result = replay(path, f"http://127.0.0.1:{ingest_port(tmp_path)}/ingest", rate=0, batch=20, token=TOKEN)
        assert result == {"sent": 50, "accepted": 50, "corrupt_in_file": 0, "refused_by_sidecar": 0,
                          "retries": 0}
        assert metrics(port)["latentwatch_records_received"].samples[0].value == 653
    finally:
        code, err = stop(proc)
    assert code == 0
    last = json.loads(err.strip().splitlines()[-1])
    assert last["msg"].startswith("stopped after") and '"records": 653' in last["msg"]


def test_records_written_before_sigterm_are_accounted(artifacts, tmp_path):
    proc, _, live = start(artifacts, tmp_path, source={"kind": "file", "path": str(tmp_path / "live.lwsr"),
                                                          "poll_seconds": 30})
    with FileSink(live) as sink:
        for r in make_records(120, np.random.default_rng(2)):
            sink.write(r)
    code, err = stop(proc)  # the source sleeps 30 s between polls: only the shutdown drain can see them
    assert code == 0
    assert '"records": 120' in json.loads(err.strip().splitlines()[-1])["msg"]


def test_bad_config_gives_a_clear_error_and_nonzero_exit(tmp_path, artifacts):
    cases = {
        "missing.yaml": ({"source": {"kind": "none"}}, "baseline"),
        "typo.yaml": ({"baseline": "x", "prot": 1, "source": {"kind": "none"}}, "prot"),
        "nofile.yaml": ({"baseline": str(artifacts / "baseline.safetensors")}, "source.path"),
        "nobaseline.yaml": ({"baseline": str(tmp_path / "nope.safetensors"), "source": {"kind": "none"}},
                            "not a readable baseline"),
    }
    for name, (config, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps(config))
        proc = subprocess.run([sys.executable, "-m", "monitor", "serve", "-c", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert expected in proc.stdout + proc.stderr, (name, proc.stdout, proc.stderr)


def test_environment_overrides_the_file(tmp_path, artifacts):
    from monitor.sidecar.settings import load_settings

    (tmp_path / "c.yaml").write_text(json.dumps({"baseline": "a", "port": 1, "source": {"kind": "none"}}))
    import os

    os.environ["LATENTWATCH_PORT"] = "9999"
    try:
        assert load_settings(tmp_path / "c.yaml").port == 9999
    finally:
        del os.environ["LATENTWATCH_PORT"]


def test_metrics_negotiate_openmetrics_and_gzip_and_carry_build_and_process_info(artifacts, tmp_path):
    import gzip

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    from monitor import version

    proc, port, _ = start(artifacts, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        req = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0",
                                                   "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert resp.headers["Content-Encoding"] == "gzip"
            text = gzip.decompress(resp.read()).decode()
        assert text.rstrip().endswith("# EOF")  # OpenMetrics framing, and it parses as such
        names = {f.name for f in openmetrics_families(text)}
        assert {"latentwatch_build", "process_resident_memory_bytes", "latentwatch_records_received"} <= names
        plain = metrics(port)  # no Accept: the classic text format, uncompressed
        build = plain["latentwatch_build_info"].samples[0].labels  # the classic format: a gauge
        assert build["version"] == version() and build["baseline_format"] == "3"
        assert plain["process_resident_memory_bytes"].samples[0].value > 0
    finally:
        assert stop(proc)[0] == 0


def test_gzip_only_when_accepted_with_a_positive_q():
    from monitor.sidecar.http import _accepts_gzip

    assert _accepts_gzip("gzip") and _accepts_gzip("deflate, gzip;q=0.5") and _accepts_gzip("*")
    assert not _accepts_gzip("gzip;q=0") and not _accepts_gzip("identity") and not _accepts_gzip("")
