"""Dashboards: built by the SDK, committed in sync, every query valid PromQL, push requests as Grafana expects.

No Grafana server can run here: the push is checked against a loopback HTTP server that records the
requests grafana-client sends (what a Grafana would receive); that every panel query returns data is
checked against a real Prometheus in tests/test_e2e_alerting.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from typer.testing import CliRunner

from monitor.cli import app
from monitor.ops import dashboards
from tests.kafka_broker import free_port

ROOT = Path(__file__).resolve().parents[1]
FILES = {name: ROOT / "dashboards" / f"latentwatch-{name}.json" for name in dashboards.BUILDERS}


def test_committed_json_is_what_the_code_builds(tmp_path):
    dashboards.write(tmp_path)
    for path in FILES.values():
        assert (tmp_path / path.name).read_text() == path.read_text(), "run `latentwatch dashboards build`"


def test_sdk_round_trip_and_variables():
    register_default_plugins()
    for name, path in FILES.items():
        obj = json.loads(path.read_text())
        assert json.loads(JSONEncoder().encode(Dashboard.from_json(obj))) == obj  # nothing the SDK drops
        names = [v["name"] for v in obj["templating"]["list"]]
        assert names[:2] == ["datasource", "model_name"]
        assert {"overview": [], "concepts": ["concept"], "internals": ["site"]}[name] == names[2:]
        queries = list(dashboards.panel_queries(obj))
        assert queries and all('model_name=~"$model_name"' in q or "up{" in q or "ALERTS" in q for _, q in queries)
        assert len({p["uid"] if "uid" in p else p["title"] for p in obj["panels"]}) == len(obj["panels"])


@pytest.mark.integration
def test_every_panel_query_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool") or pytest.fail("promtool missing: .ci/run installs prometheus")
    rules = []
    for path in FILES.values():
        for _title, expr in dashboards.panel_queries(json.loads(path.read_text())):
            rules.append({"record": f"panel:query:{len(rules)}", "expr": dashboards.concrete(expr)})
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "q.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(rules) >= 20


class Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.requests.append((self.path, dict(self.headers), json.loads(body)))
        uid = json.loads(body)["dashboard"]["uid"]
        answer = json.dumps({"status": "success", "uid": uid, "url": f"/d/{uid}", "version": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.mark.integration
def test_push_sends_each_dashboard_to_the_dashboard_api():
    Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(app, ["dashboards", "push", "--url", url, "--folder-uid", "ml"],
                                    env={"GRAFANA_TOKEN": "glsa_test"})
        assert result.exit_code == 0, result.output
    finally:
        server.shutdown()
        server.server_close()
    assert [r[0] for r in Recorder.requests] == ["/api/dashboards/db"] * 3
    for (_, headers, payload), path in zip(Recorder.requests, FILES.values(), strict=True):
        assert headers["Authorization"] == "Bearer glsa_test"
        assert payload["overwrite"] is True and payload["folderUid"] == "ml"
        assert payload["dashboard"] == {**json.loads(path.read_text()), "id": None}


def test_push_to_nowhere_is_a_clear_error():
    result = CliRunner().invoke(app, ["dashboards", "push", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2 and "pushing to" in result.output


def test_every_panel_has_a_description_and_every_alert_a_dashboard_url():
    import json

    from monitor.ops import rules

    uids = set()
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel.get("description"), f"{path.name}: {panel['title']} has no description"
    for group in rules.rule_groups()["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                url = rule["annotations"]["dashboard_url"]
                assert url.split("/d/", 1)[1].split("?")[0] in uids, url
