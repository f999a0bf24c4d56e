"""Soak: a real ``latentwatch serve`` on loopback under mixed load, with forced restarts and rotations.

Load: a tap-like writer appends records to a rotating ``FileSink`` (small files: a rotation every ~150
records), an ingest client posts bodies with the bearer token, idle connections sit on the scrape port,
and a scraper reads ``/metrics`` all along. Halfway the traffic drifts (a concept surge) so alarms fire;
the sidecar is restarted every few seconds, alternately with SIGTERM and SIGKILL, while the writer goes
on writing. The checkpoint carries windows, alarm state, counters and the reading position across the
restarts. An ``/ingest`` body is answered once a checkpoint covers it, so the ingest client posts straight
through every SIGKILL, retrying a body that got no answer with the same ``Idempotency-Key`` until it is
answered: every answered body must be counted once after the restarts, whether its first answer was lost
or not.

Printed, as one JSON object on the last line:
  records_written  (file + accepted by ingest), records_counted (``latentwatch_records_received_total`` at
  the end: must be equal), alarms_refired_after_restart (from the sidecar's log of all runs: an alarm of
  a detector whose previous event, in this or an earlier run, was also an alarm, with no "cleared"
  between; i.e. fired again while it was already firing: must be 0; alarms after a clear are new
  alarms, not re-fires), peak_rss_mib (largest VmHWM of any sidecar run),
  metrics_latency_ms p50/p99/max and failures (scrapes that did not answer 200), restarts, rotations.

Usage: python bench/soak.py [--quick]     (quick: ~45 s, 4 restarts; default: ~5 min, 16 restarts)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from collectors.record import Record, encode
from collectors.sinks import FileSink
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.probes.probe import Probe, ProbeSet

D, H, FP = 32, 4, "sha256:" + "ab" * 16
TOKEN = "soak-token-0123456789abcdef"


def make_records(n: int, rng: np.random.Generator, start: int, shift: float = 0.0) -> list[Record]:
    out = []
    for i in range(n):
        mean = rng.normal(size=D).astype(np.float32)
        mean[0] += shift
        out.append(Record(model="soak", fingerprint=FP, key=f"{start + i:032x}", n_tokens=8, ts=time.time(),
                          meta={"replica": "pod-0", "tap_sampled": str(start + i + 1)},
                          sites={"layers.2.resid": {"mean": mean, "last": rng.normal(size=D).astype(np.float32),
                                                    "norm": np.abs(rng.normal(5, 1, size=2)).astype(np.float32)},
                                 "layers.2.attn": {"heads": rng.normal(1.0, 0.1, size=(H, 4)).astype(np.float32)}}))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def refires(log_text: str) -> tuple[int, int]:
    """``(re-fires, alarms)`` in a sidecar log of several runs: an alarm while the detector was firing."""
    firing: dict[str, bool] = {}
    refired = alarms = 0
    for m in re.finditer(r"DRIFT (\S+): statistic|cleared (\S+): statistic", log_text):
        if m.group(1):
            alarms += 1
            refired += firing.get(m.group(1), False)
            firing[m.group(1)] = True
        else:
            firing[m.group(2)] = False
    return refired, alarms


def hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ingest", action="store_true", help="file source only (to tell which path loses)")
    args = ap.parse_args()
    restarts, interval = (4, 6.0) if args.quick else (16, 15.0)
    folder = Path(tempfile.mkdtemp(prefix="lw-soak-"))
    rng = np.random.default_rng(0)
    w0 = np.zeros(D, np.float32)
    w0[0] = 3.0
    probes = ProbeSet([Probe("injection", "layers.2.resid", "mean", w0, -4.0, "soak", FP)])
    (folder / "probes").mkdir()
    for p in probes.probes:
        p.save(folder / "probes" / f"{p.concept}.probe.json")
    Baseline.build(make_records(3000, rng, 0), ProbeSet.load_dir(folder / "probes", fingerprint=FP),
                   AnalyzerConfig(window=100, stride=10, false_alarm_every=2000, pca_components=6,
                                  max_calibration_evaluations=3000)).save(folder / "baseline.safetensors")
    (folder / "token").write_text(TOKEN)
    live = folder / "live.lwsr"
    port, iport = free_port(), free_port()
    config = {"baseline": str(folder / "baseline.safetensors"), "probes": str(folder / "probes"), "port": port,
              "source": {"kind": "file", "path": str(live), "from_start": False, "poll_seconds": 0.1},
              "ingest": {"enabled": True, "port": iport, "token_file": str(folder / "token")},
              "http": {"header_timeout_seconds": 3, "max_connections": 64},
              "checkpoint": {"path": str(folder / "state" / "ckpt"), "interval_seconds": 0.5}}
    (folder / "sidecar.yaml").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (folder / "sidecar.log").open("w")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "-c", str(folder / "sidecar.yaml")],
                                stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 60
        while get(f"http://127.0.0.1:{port}/readyz", 1)[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sidecar did not start: see {folder / 'sidecar.log'}")
            time.sleep(0.1)
        return proc

    sink = FileSink(live, max_bytes=128 * 1024, backups=50)
    stop = threading.Event()
    drift = threading.Event()
    written = {"file": 0, "ingest": 0, "ingest_retries": 0, "ingest_duplicates": 0, "ingest_not_durable": 0}
    latencies: list[float] = []
    failures = [0]
    serving = threading.Event()

    def writer() -> None:
        n = 0
        wrng = np.random.default_rng(1)
        while not stop.is_set():
            for r in make_records(20, wrng, 10_000_000 + n, 3.0 if drift.is_set() else 0.0):
                sink.write(r)
            sink.flush()
            n += 20
            written["file"] = n
            time.sleep(0.02)

    def ingester() -> None:
        irng = np.random.default_rng(2)
        n = 0
        while not stop.is_set():
            body = b"".join(encode(r) for r in make_records(50, irng, 20_000_000 + n, 3.0 if drift.is_set() else 0.0))
            headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": f"soak-{n}"}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the same body, the same key, until it is answered
                req = urllib.request.Request(f"http://127.0.0.1:{iport}/ingest", data=body, method="POST",
                                             headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        answer = json.loads(resp.read())
                    break
                except OSError:  # restarting (no answer, 503) or busy (409): retried
                    written["ingest_retries"] += 1
                    time.sleep(0.1)
            else:
                raise SystemExit("an ingest body got no answer for 120 s")
            written["ingest"] += answer["accepted"]
            written["ingest_duplicates"] += bool(answer.get("duplicate"))
            written["ingest_not_durable"] += not answer.get("durable", False)
            n += 50
            time.sleep(0.05)

    def scraper() -> None:
        while not stop.is_set():
            if serving.is_set():
                t0 = time.perf_counter()
                code, _ = get(f"http://127.0.0.1:{port}/metrics")
                if serving.is_set():  # a restart may have begun meanwhile: then it does not count
                    if code == 200:
                        latencies.append((time.perf_counter() - t0) * 1000)
                    else:
                        failures[0] += 1
            time.sleep(0.1)

    def idlers() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
                s.sendall(b"GET /metr")  # never finishes its headers
                socks.append(s)
            except OSError:
                pass
            if len(socks) > 100:
                socks.pop(0).close()
            time.sleep(0.05)
        for s in socks:
            s.close()

    proc = start()
    serving.set()
    loads = (writer, scraper, idlers) if args.no_ingest else (writer, ingester, scraper, idlers)
    threads = [threading.Thread(target=f, daemon=True) for f in loads]
    for t in threads:
        t.start()
    peak = hwm(proc.pid)
    t_start = time.monotonic()
    for i in range(restarts):
        time.sleep(interval)
        if i == 0:
            drift.set()  # alarms fire during the next interval and stay active
        peak = max(peak, hwm(proc.pid))
        serving.clear()
        if i % 2 == 0:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        else:
            proc.kill()
            proc.wait(10)
        time.sleep(0.5)  # records keep being written (and rotated) while it is down
        proc = start()
        serving.set()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    sink.close()
    total = written["file"] + written["ingest"]
    deadline = time.monotonic() + 120
    counted = 0.0
    while time.monotonic() < deadline:
        counted = metric(get(f"http://127.0.0.1:{port}/metrics")[1], "latentwatch_records_received_total")
        if counted >= total:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    counted = metric(get(f"http://127.0.0.1:{port}/metrics")[1], "latentwatch_records_received_total")
    final_alarms = metric(get(f"http://127.0.0.1:{port}/metrics")[1], "latentwatch_drift_alarms_total")
    peak = max(peak, hwm(proc.pid))
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    log.close()
    refired, alarms_logged = refires((folder / "sidecar.log").read_text())
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    print(json.dumps({
        "records_written": total, "records_counted": int(counted), "equal": int(counted) == total,
        "file_records": written["file"], "ingest_accepted": written["ingest"],
        "ingest_retried_posts": written["ingest_retries"],
        "ingest_answered_as_duplicate": written["ingest_duplicates"],
        "ingest_answered_not_durable": written["ingest_not_durable"],
        "alarms_fired_total": int(final_alarms), "alarms_logged": alarms_logged,
        "alarms_refired_after_restart": refired, "restarts": restarts,
        "rotations": sink.rotations,
        "peak_rss_mib": round(peak / 2**20, 1),
        "metrics_latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                               "p99": round(float(np.percentile(lat, 99)), 1), "max": round(float(lat.max()), 1),
                               "scrapes": len(latencies), "failures": failures[0]},
        "seconds": round(time.monotonic() - t_start, 1)}))


if __name__ == "__main__":
    main()
