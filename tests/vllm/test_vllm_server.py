"""The plugin in vLLM's OpenAI server: records from real HTTP requests, counters on vLLM's ``/metrics``.

The server runs as vLLM documents it for CPU (``python -m vllm.entrypoints.openai.api_server
--enforce-eager``), with its engine in a separate process: the tap's counters cross from the engine process
to the API server's ``/metrics`` through the counter files (:mod:`collectors.vllm.stats`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from collectors import Sampler, read_file
from collectors import models as lw_models
from tests.vllm.test_vllm_plugin import SALT

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) while waiting for {what}")
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _metric(text: str, name: str, labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_openai_server_records_and_metrics(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm builds a venv with it)")
    port = _free_port()
    records = tmp_path / "records.lwsr"
    config = tmp_path / "tap.yaml"
    config.write_text(f"sink: file:{records}\nsample_rate: 1.0\nsites: [layers.9.resid, layers.29.resid]\n"
                      "metadata: {tenant: test}\n")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "LATENTWATCH_VLLM_CONFIG": str(config),
           "LATENTWATCH_TAP_SALT": SALT}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(lw_models.smollm2_folder()),
         "--served-model-name", "smollm2-test", "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
         "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(f"{base}/health") is not None, 300, "the server to be healthy", proc)
        ids = ["req-a", "req-b", "req-c"]
        for i, rid in enumerate(ids):
            body = json.dumps({"model": "smollm2-test", "prompt": f"Tell me a short story number {i}.",
                               "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json",
                                                                            "X-Request-Id": rid})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["usage"]["completion_tokens"] == 8  # served, decode included
        def scraped() -> str | None:
            text = _get(f"{base}/metrics")
            done = _metric(text, "latentwatch_tap_records_emitted_total", 'model_name="smollm2-test"') == 3
            return text if done else None

        text = _wait(scraped, 60, "the tap's counters on /metrics", proc)
        assert _metric(text, "latentwatch_tap_requests_sampled_total", 'model_name="smollm2-test"') == 3
        assert _metric(text, "latentwatch_tap_errors_total", 'kind="hook"') == 0
        # vLLM's own series carry the same model_name label, so dashboards join them
        assert _metric(text, "vllm:prompt_tokens_total", 'model_name="smollm2-test"') > 0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    got = list(read_file(records))
    assert len(got) == 3
    sampler = Sampler(1.0, SALT.encode())
    # the key is vLLM's per-prompt request id (cmpl-<X-Request-Id>-<prompt index>), hashed with the salt
    assert sorted(r.key for r in got) == sorted(sampler.hashed_key(f"cmpl-{rid}-0") for rid in ids)
    assert {r.model for r in got} == {"smollm2-test"} and {r.meta["tenant"] for r in got} == {"test"}
