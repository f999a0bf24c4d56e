"""The built wheel, installed as the sidecar image installs it, into a clean venv: it is complete and serves.

The wheel is built from a copy of the checkout's files (tracked and not ignored: what a clean clone
holds), installed with the extras the Dockerfile's sidecar stage names into a new venv (not editable,
the checkout not on its path), and driven through its own ``latentwatch``: ``--version``, ``serve`` fed
by ``replay`` with ``/metrics`` checked, ``baseline show``, ``probes show``, the built-in concept pack,
and no torch, transformers or matplotlib in that install. The baseline and probes it serves are made
here, in the development environment, from synthetic records.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from collectors.sinks import FileSink
from monitor.analysis.baseline import Baseline
from monitor.probes.probe import CAVEAT
from tests.kafka_broker import free_port
from tests.test_analyzer import CONFIG, make_records, probes
from tests.test_sidecar import get, metrics, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
HEAVY = ("torch", "transformers", "matplotlib")  # none of these belongs in the sidecar image (scipy and
# scikit-learn do: the analysis core computes binomial tails and Ledoit-Wolf covariances)


def sidecar_extras() -> str:
    """The extras the Dockerfile's sidecar stage installs the wheel with (the image's install step)."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    stage = dockerfile.split("AS sidecar", 1)[1]
    found = re.findall(r"pip install \"\$\(ls \S+/latentwatch-\*\.whl\)\[([a-z,]+)\]\"", stage)
    assert len(found) == 1, "the sidecar stage must install the built wheel, once"
    return found[0]


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    """(venv folder, wheel path, source copy, a scratch folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("packaging")
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT, check=True)
    src = tmp / "src"
    for name in filter(None, files.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)], tmp)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("latentwatch-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[{sidecar_extras()}]"], tmp,
              env=env)
    assert pip.returncode == 0, pip.stderr
    work = tmp / "work"
    work.mkdir()
    return venv, wheel, src, work


def clean_env() -> dict[str, str]:
    """The environment for the installed commands: nothing that points back at the checkout."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("LATENTWATCH_")}


def installed(venv: Path, *args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run([str(venv / "bin" / args[0]), *args[1:]], cwd, env=clean_env(), **kwargs)


def test_wheel_holds_every_module_and_the_concept_pack(install):
    _, wheel, src, _ = install
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("collectors", "monitor"):
        for path in (src / package).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                assert path.relative_to(src).as_posix() in names, f"missing from the wheel: {path.relative_to(src)}"
    assert any(n.startswith("monitor/") and "/detectors/" in n for n in names)
    assert {n.split("/")[0] for n in names if "/" in n} == {"collectors", "monitor", wheel.name.split("-py3")[0]
                                                            + ".dist-info"}


def test_installed_from_the_wheel_not_the_checkout(install):
    venv, _, _, work = install
    out = installed(venv, "python", "-c", "import collectors, monitor; print(monitor.__file__, collectors.__file__)",
                    cwd=work)
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert Path(path).is_relative_to(venv), path
    editable = installed(venv, "python", "-m", "pip", "show", "-f", "latentwatch", cwd=work)
    assert "__editable__" not in editable.stdout and "Editable project location" not in editable.stdout


def test_version(install):
    venv, _, _, work = install
    out = installed(venv, "latentwatch", "--version", cwd=work)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"latentwatch {VERSION}"


def test_sidecar_install_has_no_torch_transformers_or_matplotlib(install):
    venv, _, _, work = install
    code = f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"
    out = installed(venv, "python", "-c", code, cwd=work)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # commands that need them say which extra to install, in one line
    report = installed(venv, "latentwatch", "report", "x.lwsr", "--baseline", "b.safetensors", cwd=work)
    assert report.returncode == 2
    assert report.stderr.strip().splitlines() == ["error: this command needs matplotlib: pip install "
                                                  "'latentwatch[report]'"]


def test_builtin_concept_pack_is_complete(install):
    venv, _, _, work = install
    expected = sorted(p.stem for p in (ROOT / "monitor").rglob("concept_pack/*.yaml"))
    assert len(expected) >= 5
    code = ("import json; from monitor.probes.concepts import builtin_specs; "
            "print(json.dumps(sorted(s.concept for s in builtin_specs())))")
    out = installed(venv, "python", "-c", code, cwd=work)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected
    # the gate's built-in suite ships too, and names only concepts of the pack
    code = ("import json; from monitor.gate.suite import load_suite; "
            "print(json.dumps(sorted(s.concept for s in load_suite('builtin:smollm2').specs)))")
    out = installed(venv, "python", "-c", code, cwd=work)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) <= set(expected)
    gate = installed(venv, "latentwatch", "gate", "--model", "smollm2", "--suite", "builtin:smollm2", cwd=work)
    assert gate.returncode == 2 and gate.stderr.strip().startswith("error: this command needs torch")


def test_serve_replay_metrics_from_the_install(install):
    venv, _, _, work = install
    # artifacts made here (development environment) from synthetic records
    pset = probes()
    (work / "probes").mkdir()
    for p in pset.probes:
        p.card = {"concept": p.concept, "site": p.site, "pooling": p.pooling, "caveat": CAVEAT,
                  "held_out": {"auroc": 0.9, "accuracy": 0.85, "ece": 0.03}, "shuffled_label_control_auroc": 0.5,
                  "training": {"train_size": 400, "held_out_size": 100}}
        p.save(work / "probes" / f"{p.concept}.probe.json")
    Baseline.build(make_records(3000, np.random.default_rng(0)), pset, CONFIG).save(work / "baseline.safetensors")
    rng = np.random.default_rng(1)
    with FileSink(work / "stream.lwsr") as sink:
        for r in make_records(300, rng) + make_records(200, rng, concept_shift=2.0):
            sink.write(r)

    shown = installed(venv, "latentwatch", "baseline", "show", "baseline.safetensors", cwd=work)
    assert shown.returncode == 0, shown.stderr
    assert "rate:scores" in shown.stdout
    cards = installed(venv, "latentwatch", "probes", "show", "probes", cwd=work)
    assert cards.returncode == 0, cards.stderr
    # the cards table (column widths follow the pipe's 80 columns) and the correlational-evidence caveat
    assert "probe cards" in cards.stdout and "not proof of mechanism" in cards.stdout

    port, iport = free_port(), free_port()
    (work / "token").write_text("t0ken-" + "x" * 26)  # ingest is opt-in and credentialed (its own port)
    (work / "sidecar.yaml").write_text(json.dumps({
        "baseline": "baseline.safetensors", "probes": "probes", "source": {"kind": "none"}, "port": port,
        "ingest": {"enabled": True, "port": iport, "token_file": "token"}}))
    proc = subprocess.Popen([str(venv / "bin" / "latentwatch"), "serve", "-c", "sidecar.yaml"], cwd=work,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or get(f"http://127.0.0.1:{port}/readyz")[0] == 200, what="readyz")
        assert proc.poll() is None, proc.stderr.read()
        sent = installed(venv, "latentwatch", "replay", "stream.lwsr", "--url", f"http://127.0.0.1:{iport}/ingest",
                         "--batch", "50", "--token-file", "token", cwd=work)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["accepted"] == 500
        m = metrics(port)
        assert m["latentwatch_records_received"].samples[0].value == 500
        count = {s.labels["concept"]: s.value for s in m["latentwatch_concept_score"].samples
                 if s.name.endswith("_count")}
        assert count == {"injection": 500, "toxicity": 500}
        alarms = {s.labels["detector"]: s.value for s in m["latentwatch_drift_alarms"].samples
                  if s.name.endswith("_total")}
        assert alarms["rate:scores"] >= 1  # the concept surge in the last 200 records
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
