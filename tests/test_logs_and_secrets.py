"""JSON logs keep exceptions inside the object; the tap's key-hashing salt has no public default."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading

import pytest
import torch

from collectors import QueueSink, Tap
from collectors.sampling import SALT_ENV, deployment_salt
from monitor.sidecar.service import JsonFormatter, install_excepthooks
from tests.kafka_broker import free_port
from tests.test_sidecar import get, make_artifacts, wait_for


def test_salt_comes_from_the_deployment_or_is_random(monkeypatch, caplog):
    monkeypatch.delenv(SALT_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        a, b = deployment_salt(), deployment_salt()
    assert a != b and len(a) == 32 and b"latentwatch" not in (a, b)
    assert "random per-process salt" in caplog.text
    monkeypatch.setenv(SALT_ENV, "per-deployment-secret")
    assert deployment_salt() == b"per-deployment-secret"
    assert deployment_salt(b"explicit-salt") == b"explicit-salt"
    with pytest.raises(ValueError, match="at least 8 bytes"):
        deployment_salt(b"short")
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert Tap(net, ["0"], sink=QueueSink()).sampler.salt == b"per-deployment-secret"
    monkeypatch.delenv(SALT_ENV)
    t1, t2 = Tap(net, ["0"], sink=QueueSink()), Tap(net, ["0"], sink=QueueSink())
    assert t1.sampler.salt != t2.sampler.salt
    assert t1.sampler.hashed_key("req-1") != t2.sampler.hashed_key("req-1")


def test_exceptions_are_a_field_of_the_json_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("latentwatch.crash")
    logger.addHandler(handler)
    old = threading.excepthook
    try:
        install_excepthooks()

        def boom() -> None:
            raise RuntimeError("multi\nline")

        t = threading.Thread(target=boom, name="boom-thread")
        t.start()
        t.join()
    finally:
        threading.excepthook = old
        sys.excepthook = sys.__excepthook__
        logger.removeHandler(handler)
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["exc_type"] == "RuntimeError" and "Traceback" in obj["exc"] and "boom-thread" in obj["msg"]


@pytest.mark.integration  # the real sidecar as a subprocess
def test_sidecar_logs_stay_json_when_the_source_fails(tmp_path_factory, tmp_path):
    artifacts = make_artifacts(tmp_path_factory.mktemp("logs"))
    port = free_port()  # the signature file does not exist yet at start (a tap that has not written)
    config = {"baseline": str(artifacts / "baseline.safetensors"), "probes": str(artifacts / "probes"),
              "source": {"kind": "file", "path": str(tmp_path / "adir"), "poll_seconds": 0.1}, "port": port}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    err = tmp_path / "stderr"
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "-c", str(tmp_path / "c.yaml")],
                                stdout=subprocess.DEVNULL, stderr=f)
        try:
            wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, what="the sidecar")
            (tmp_path / "adir").mkdir()  # then a directory appears where the file should be: every poll fails
            wait_for(lambda: "IsADirectoryError" in err.read_text(), what="a logged source failure")
            assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = err.read_text().strip().splitlines()
    objs = [json.loads(line) for line in lines]  # every line is one JSON object
    failed = [o for o in objs if o["msg"].startswith("source poll failed")]
    assert failed and failed[0]["exc_type"] == "IsADirectoryError" and "Traceback" in failed[0]["exc"]
