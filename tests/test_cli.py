"""The latentwatch command, run as a user would run it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from collectors.sinks import read_file
from monitor.cli import app

runner = CliRunner()


def test_sites_lists_readable_names_for_an_encoder(minilm):
    result = runner.invoke(app, ["sites", "minilm"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, module in (("layers.5.attn", "encoder.layer.5.attention.self"), ("layers.0.resid", "encoder.layer.0"),
                         ("embed", "embeddings")):
        line = next(line for line in result.output.splitlines() if f" {name} " in line)
        assert module in line


def test_sites_for_a_decoder_marks_defaults(smollm2):
    result = runner.invoke(app, ["sites", "smollm2", "--kind", "resid"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "model.layers.29 " in result.output
    default_lines = [line for line in result.output.splitlines() if line.rstrip(" │").endswith("yes")]
    assert len(default_lines) == 3
    assert "attn" not in result.output.split("┃")[-1]  # filtered by --kind


def test_demo_quick_records_real_signatures_and_sees_the_shift(tmp_path, smollm2):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{\n"):])
    assert summary["records"] == 96
    assert summary["tap"]["hook_errors"] == summary["tap"]["worker_errors"] == 0
    records = list(read_file(tmp_path / "signatures.lwsr"))
    assert len(records) == 96
    assert {r.meta["route"] for r in records} == {"reference", "live-normal", "live-shifted"}
    # the injection prompts move the deepest residual stream further than ordinary dialog does
    last = [k for k in summary["shift_z"] if k.startswith("layers.29.resid")]
    assert summary["shift_z"]["layers.29.resid/live-shifted"] > 2 * summary["shift_z"]["layers.29.resid/live-normal"]
    assert len(last) == 2

    inspected = runner.invoke(app, ["inspect", str(tmp_path / "signatures.lwsr"), "--limit", "1"])
    assert inspected.exit_code == 0
    assert "96 records, 0 corrupt" in inspected.output


def test_inspect_fails_on_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.lwsr"
    path.write_bytes(b"LWSR" + b"\x01" + b"\x00" * 40)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
