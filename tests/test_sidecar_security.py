"""The sidecar under attack, against the real server on loopback: ingest is opt-in and credentialed, bodies
are bounded (memory measured), slow or many clients cannot starve /metrics."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from collectors.record import encode
from tests.test_analyzer import make_records
from tests.test_sidecar import TOKEN, get, ingest_port, make_artifacts, start, stop, wait_for

pytestmark = pytest.mark.integration  # the real sidecar on loopback

MiB = 1 << 20


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("sidecar-security"))


def post(port: int, body: bytes, token: str | None = TOKEN, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/octet-stream", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    try:
        if "Transfer-Encoding" in h:
            conn.putrequest("POST", "/ingest")
            for k, v in h.items():
                conn.putheader(k, v)
            conn.endheaders()
            conn.send(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        else:
            conn.request("POST", "/ingest", body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data or b"{}")
        except ValueError:
            return resp.status, {"text": data.decode(errors="replace")}
    finally:
        conn.close()


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def body_of(n: int, seed: int = 0, **kw) -> bytes:
    return b"".join(encode(r) for r in make_records(n, np.random.default_rng(seed), **kw))


def test_ingest_is_off_by_default_and_not_on_the_scrape_port(artifacts, tmp_path):
    proc, port, _ = start(artifacts, tmp_path)
    try:
        status, _ = post(port, body_of(5))
        assert status in (404, 405)  # the scrape listener has no /ingest
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        assert stop(proc)[0] == 0


def test_ingest_needs_the_token_and_refuses_bad_bodies_with_a_reason(artifacts, tmp_path):
    proc, port, _ = start(artifacts, tmp_path, ingest=True)
    iport = ingest_port(tmp_path)
    try:
        good = body_of(30)
        assert post(iport, good, token=None)[0] == 401
        assert post(iport, good, token="x" * len(TOKEN))[0] == 401
        assert post(iport, good, token=TOKEN + "x")[0] == 401
        status, answer = post(iport, good)
        assert (status, answer["accepted"]) == (200, 30)

        status, answer = post(iport, good, headers={"Transfer-Encoding": "chunked"})
        assert status == 411 and "chunked" in answer["error"]
        status, answer = post(iport, b"x" * (9 * MiB))  # over the default 8 MiB
        assert status == 413 and "bytes" in answer["error"]
        status, answer = post(iport, b"LWSR\x01\x00\x00\x00" + b"garbage" * 10)
        assert status == 400 and "record 0" in answer["error"]
        status, answer = post(iport, good[:-3])  # a torn last record
        assert status == 400
        status, answer = post(iport, good + body_of(2, fp="sha256:" + "ee" * 16))
        assert status == 422 and "another model" in answer["error"]
        huge = make_records(3, np.random.default_rng(5))
        huge[1].sites["layers.2.resid"]["mean"][3] = 1e12  # finite but physically implausible
        status, answer = post(iport, b"".join(encode(r) for r in huge))
        assert (status, answer["accepted"], answer["invalid"]) == (200, 2, 1)

        m = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert 'latentwatch_records_received_total{model_name="m"} 33.0' in m  # refused bodies analyze nothing
        assert 'reason="fingerprint"} 1.0' in m and 'reason="implausible"} 1.0' in m
    finally:
        assert stop(proc)[0] == 0


def test_concurrent_bodies_are_capped_and_memory_stays_bounded(artifacts, tmp_path):
    proc, port, _ = start(artifacts, tmp_path, ingest=True)
    iport = ingest_port(tmp_path)
    try:
        # two bodies in flight (headers sent, body trickling): a third is refused at once with 503
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", iport))
            s.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Length: 100000\r\n\r\n".encode() + b"L")
            held.append(s)
        _, answer = wait_for(lambda: (r := post(iport, body_of(3)))[0] == 503 and r, timeout=10,
                                  what="503 with two bodies in flight")
        assert "max_concurrent_bodies" in answer["error"]
        for s in held:
            s.close()
        wait_for(lambda: post(iport, body_of(3))[0] == 200, timeout=10, what="slots freed")

        # memory: 8 clients posting near-maximal bodies of many small records, over and over
        before = rss(proc.pid)["VmRSS"]
        big = body_of(4000, seed=3)  # ~4000 records: under max_records_per_body, ~1.1 MiB of tiny records
        codes: list[int] = []

        def client() -> None:
            for _ in range(6):
                codes.append(post(iport, big)[0])

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = rss(proc.pid)["VmHWM"]
        assert set(codes) <= {200, 503} and 200 in codes
        # stated bound (docs/sidecar.md): ingest adds at most ~160 MiB at the defaults
        assert peak - before < 160 * MiB, (before, peak)
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        assert stop(proc)[0] == 0


def test_slow_and_many_clients_cannot_starve_metrics(artifacts, tmp_path):
    proc, port, _ = start(artifacts, tmp_path, ingest=True,
                          http={"header_timeout_seconds": 2, "max_connections": 64, "body_timeout_seconds": 2})
    iport = ingest_port(tmp_path)
    socks: list[socket.socket] = []
    try:
        # a slowloris: connections that never finish their headers, more than the connection cap
        for i in range(150):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /metr" if i % 2 else b"")
            socks.append(s)
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        # a partial header is closed after the header deadline
        s = socks[-1]
        s.settimeout(20)
        assert s.recv(100) == b""
        # a body that never completes gets 408 after the body deadline
        slow = socket.create_connection(("127.0.0.1", iport))
        slow.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: 5000\r\n\r\nLWSR".encode())
        slow.settimeout(20)
        assert slow.recv(200).startswith(b"HTTP/1.1 408")
        slow.close()

        # /metrics answers while ingest is loaded
        stop_flag = threading.Event()
        body = body_of(500, seed=4)
        sent: list[int] = []

        def load() -> None:
            while not stop_flag.is_set():
                sent.append(post(iport, body)[0])

        loaders = [threading.Thread(target=load) for _ in range(3)]
        for t in loaders:
            t.start()
        try:
            wait_for(lambda: len(sent) >= 3, timeout=60, what="ingest load")
            for _ in range(10):
                assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        finally:
            stop_flag.set()
            for t in loaders:
                t.join()
        assert 200 in sent
    finally:
        for s in socks:
            s.close()
        assert stop(proc)[0] == 0


def test_bad_ingest_configs_exit_2_naming_the_field(artifacts, tmp_path):
    import subprocess
    import sys

    base = {"baseline": str(artifacts / "baseline.safetensors"), "source": {"kind": "none"}}
    (tmp_path / "short").write_text("abc")
    cases = {
        "notoken": ({"ingest": {"enabled": True}}, "ingest.token_file or ingest.token_env"),
        "short": ({"ingest": {"enabled": True, "token_file": str(tmp_path / "short")}}, "at least 16"),
        "noenv": ({"ingest": {"enabled": True, "token_env": "LW_NO_SUCH_VAR_FOR_TEST"}}, "ingest.token_env"),
        "sameport": ({"port": 9999, "ingest": {"enabled": True, "port": 9999, "token_env": "LW_TOKEN_FOR_TEST"}},
                     "ingest.port"),
    }
    env = {**__import__("os").environ, "LW_TOKEN_FOR_TEST": TOKEN}
    for name, (config, expected) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps({**base, **config}))
        proc = subprocess.run([sys.executable, "-m", "monitor", "serve", "-c", str(tmp_path / f"{name}.yaml")],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert expected in proc.stdout + proc.stderr, (name, proc.stdout, proc.stderr)
