"""End to end with real processes on loopback: the demo's recorded stream (ordinary traffic, then
injection attempts; SmolLM2 through the tap) is replayed into Kafka (tansu) -> `latentwatch serve`
(Kafka source) -> Prometheus 2.x (scraping it, evaluating alerts/latentwatch.rules.yml with ``for:``
shortened) -> Alertmanager (deploy/alertmanager/alertmanager.yml, receivers pointed at a loopback
webhook). Asserts: no drift alert during the no-shift phase, the drift alert pages after the shift
with its labels and annotations, and every dashboard panel's query returns data from that Prometheus.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from typer.testing import CliRunner

from monitor.cli import app
from monitor.ops import dashboards, rules
from tests.kafka_broker import broker, free_port  # noqa: F401 - fixture
from tests.test_sidecar import get, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FOR_SCALE = 0.05  # for: 2m -> 6 s, 5m -> 15 s
DRIFT_ALERTS = ("LatentwatchConceptDrift", "LatentwatchInternalDrift", "LatentwatchConceptRateSurge")


class Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict]]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Webhook.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def alerts_at(path: str, names: tuple[str, ...]) -> list[dict]:
    return [a for p, body in list(Webhook.received) if p == path for a in body["alerts"]
            if a["labels"]["alertname"] in names and a["status"] == "firing"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def promql(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        answer = json.loads(resp.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def last_rule_evaluation(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as resp:
        groups = json.loads(resp.read())["data"]["groups"]
    stamps = [g.get("lastEvaluation", "") for g in groups if g["name"] == "latentwatch.alerts"]
    if not stamps or stamps[0].startswith("0001"):
        return 0.0
    from datetime import datetime

    return datetime.fromisoformat(stamps[0].replace("Z", "+00:00")[:26] + "+00:00").timestamp()


def test_alerts_page_after_a_real_shift_and_dashboards_have_data(demo_run, broker, tmp_path):  # noqa: F811
    prometheus, alertmanager = shutil.which("prometheus"), shutil.which("prometheus-alertmanager")
    if not prometheus or not alertmanager:
        pytest.fail("prometheus / prometheus-alertmanager missing: .ci/run installs the Debian packages")
    out, demo = demo_run
    assert demo.exit_code == 0, demo.output
    summary = json.loads((out / "summary.json").read_text())
    shift = summary["shift_at_record"]

    Webhook.received = []
    hook = ThreadingHTTPServer(("127.0.0.1", free_port()), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook.server_address[1]}"

    topic = broker.create_topic(partitions=2)
    side_port, prom_port, am_port = free_port(), free_port(), free_port()
    (tmp_path / "sidecar.yaml").write_text(json.dumps({
        "baseline": str(out / "baseline.safetensors"), "probes": str(out / "probes"), "port": side_port,
        "source": {"kind": "kafka", "kafka": {"bootstrap_servers": broker.bootstrap, "topic": topic,
                                              "group_id": "e2e", "session_timeout_ms": 6000,
                                              "heartbeat_interval_ms": 2000, "poll_timeout_seconds": 0.2}}}))
    (tmp_path / "latentwatch.rules.yml").write_text(rules.to_yaml(rules.rule_groups(for_scale=FOR_SCALE)))
    prom_cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    prom_cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom_cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    prom_cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{side_port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
    am_cfg = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    am_cfg["route"].update(group_wait="1s", group_interval="1s")
    am_cfg["route"]["routes"][0]["group_wait"] = "1s"
    for receiver in am_cfg["receivers"]:  # the paging and ticket routes, delivered to loopback
        receiver["webhook_configs"][0]["url"] = f"{hook_url}/{receiver['name']}"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_cfg))

    procs = [
        start([sys.executable, "-m", "monitor", "serve", "-c", str(tmp_path / "sidecar.yaml")],
              tmp_path / "sidecar.log"),
        start([alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
               f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="], tmp_path / "am.log"),
        start([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log"),
    ]
    try:
        for port, path in ((side_port, "/readyz"), (am_port, "/-/ready"), (prom_port, "/-/ready")):
            wait_for(lambda p=port, q=path: get(f"http://127.0.0.1:{p}{q}")[0] == 200, timeout=60,
                     what=f"{path} on {port}")
        replay = ["replay", str(out / "live.lwsr"), "--kafka", broker.bootstrap, "--topic", topic, "--rate", "40"]

        # --- phase 1: ordinary traffic the baseline never saw ---
        result = CliRunner().invoke(app, [*replay, "--limit", str(shift)])
        assert result.exit_code == 0, result.output
        wait_for(lambda: promql(prom_port, f"latentwatch_records_received_total >= {shift}"), timeout=60,
                 what="Prometheus scraped the no-shift phase")
        quiet_from = time.time()
        longest_for = max(s.for_seconds for s in rules.alert_specs() if s.name in DRIFT_ALERTS) * FOR_SCALE
        # Prometheus evaluated the alerts long enough for any drift alert to have fired and been sent
        wait_for(lambda: last_rule_evaluation(prom_port) > quiet_from + 2 * longest_for + 3, timeout=120,
                 what="rule evaluations after the no-shift phase")
        pattern = "|".join(DRIFT_ALERTS)
        assert promql(prom_port, f'max_over_time(ALERTS{{alertname=~"{pattern}"}}[5m])') == []
        assert alerts_at("/pager", DRIFT_ALERTS) == alerts_at("/ticket", DRIFT_ALERTS) == []

        # --- phase 2: injection and jailbreak attempts ---
        result = CliRunner().invoke(app, [*replay, "--skip", str(shift)])
        assert result.exit_code == 0, result.output
        paged = wait_for(lambda: alerts_at("/pager", ("LatentwatchConceptDrift", "LatentwatchConceptRateSurge")),
                         timeout=120, what="a drift page")
        alert = next((a for a in paged if a["labels"]["alertname"] == "LatentwatchConceptDrift"), paged[0])
        labels, notes = alert["labels"], alert["annotations"]
        assert labels["severity"] == "critical" and labels["model_name"] == summary["model"]
        if labels["alertname"] == "LatentwatchConceptDrift":
            assert labels["signal"] == "scores" and labels["detector"] in ("ks:scores", "rate:scores")
            assert "moved most: " in notes["description"] and "(+" in notes["description"]
        else:
            assert labels["concept"]
        assert "correlational evidence" in notes["description"]
        assert notes["runbook_url"].endswith(f"/docs/runbooks/{labels['alertname']}.md")
        assert (ROOT / "docs" / "runbooks" / f"{labels['alertname']}.md").exists()
        assert not alerts_at("/ticket", ("LatentwatchConceptDrift", "LatentwatchConceptRateSurge"))  # paged

        # --- every dashboard panel's query returns data from this Prometheus ---
        empty = []
        for path in sorted((ROOT / "dashboards").glob("*.json")):
            for title, expr in dashboards.panel_queries(json.loads(path.read_text())):
                if not promql(prom_port, dashboards.concrete(expr)):
                    empty.append(f"{path.name}: {title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        hook.shutdown()
        hook.server_close()
