"""The gate report for people: a terminal table and one self-contained HTML page (the JSON is the record)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

STATUS_STYLE = {"pass": "green", "fail": "bold red", "skipped": "yellow"}


def show_value(v: float | None) -> str:
    """A figure as the reports print it; None (not measurable) says so."""
    return "not measured" if v is None else f"{v:.4g}"


def print_report(report: dict[str, Any], console: Console) -> None:
    """Every check with its figures and bounds, then the verdict."""
    prev = report.get("previous")
    console.print(f"gate [bold]{report['suite']['name']}[/bold] on {report['model']['name']} "
                  f"({report['model']['fingerprint']})"
                  + (f", previous release {prev['model']['fingerprint']}" if prev else ", no previous release"))
    table = Table(show_lines=False)
    for col in ("check", "status", "figure", "value", "bound"):
        table.add_column(col, justify="right" if col in ("value", "bound") else "left")
    for c in report["checks"]:
        style = STATUS_STYLE.get(c["status"], "")
        head = f"{c['kind']}: {c['name']}"
        if not c["figures"]:
            table.add_row(head, f"[{style}]{c['status']}[/{style}]", c["summary"], "", "")
            continue
        for i, f in enumerate(c["figures"]):
            mark = "" if f["ok"] else "[bold red]x[/bold red] "
            table.add_row(head if i == 0 else "", f"[{style}]{c['status']}[/{style}]" if i == 0 else "",
                          mark + f["name"], show_value(f["value"]), f"{f['op']} {f['bound']:g}")
    console.print(table)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    skipped = [c for c in report["checks"] if c["status"] == "skipped"]
    for c in failed:
        console.print(f"[bold red]FAIL[/bold red] {c['kind']}: {c['name']}: {c['summary']}", highlight=False)
    if skipped:
        console.print(f"[yellow]skipped[/yellow] ({'fails the gate: --strict' if report['strict'] else 'not a failure'}"
                      f"): {', '.join(c['name'] for c in skipped)}: {skipped[0]['summary']}", highlight=False)
    word = "[bold green]PASSED[/bold green]" if report["passed"] else "[bold red]FAILED[/bold red]"
    console.print(f"gate {word}: {len(report['checks']) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
                  f"{len(skipped)} skipped, {report['seconds']:.0f} s")


def write_html(report: dict[str, Any], path: Path) -> Path:
    """One page, no scripts or external resources: what an approver reads before a release."""
    e = html.escape
    rows = []
    for c in report["checks"]:
        figs = c["figures"] or [None]
        for i, f in enumerate(figs):
            cells = [f"<td rowspan='{len(figs)}'>{e(c['kind'])}: {e(c['name'])}</td>"
                     f"<td rowspan='{len(figs)}' class='{e(c['status'])}'>{e(c['status'])}</td>"] if i == 0 else []
            if f is None:
                cells.append(f"<td colspan='4'>{e(c['summary'])}</td>")
            else:
                cells.append(f"<td class='{'ok' if f['ok'] else 'fail'}'>{e(f['name'])}</td>"
                             f"<td class='num'>{e(show_value(f['value']))}</td><td class='num'>{e(f['op'])} "
                             f"{f['bound']:g}</td><td>{e(f['note'])}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
    prev = report.get("previous")
    verdict = "PASSED" if report["passed"] else "FAILED"
    prompts = report.get("prompts") or {}
    suite, model = report["suite"], report["model"]
    facts = [
        ("suite", f"{suite['name']} ({suite['source']}, sha256 {suite['sha256'][:16]})"),
        ("candidate", f"{model['name']} ({model['source']}), fingerprint {model['fingerprint']}"),
        ("previous release", f"{prev['model']['fingerprint']} (report of {prev['created_at']})" if prev
         else "none: release-to-release checks skipped"),
        ("prompt set", f"{prompts.get('n', 0)} prompts from {', '.join(prompts.get('per_source', {})) or '-'}"),
        ("run", f"{report['created_at']}, {report['seconds']:.0f} s, latentwatch {report['latentwatch']}, "
                f"report sha256 {report['sha256'][:16]}"),
    ]
    info = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>latentwatch gate: {e(report['suite']['name'])} {verdict}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222 }}
table {{ border-collapse: collapse; width: 100% }} td, th {{ border: 1px solid #ccc; padding: .3em .5em;
vertical-align: top }} th {{ background: #f2f2f2; text-align: left }} .num {{ text-align: right;
font-variant-numeric: tabular-nums }} .pass, .ok {{ color: #176317 }} .fail {{ color: #b00020; font-weight: bold }}
.skipped {{ color: #8a6d00 }} .verdict {{ font-size: 1.6em }} .caveat {{ color: #555; font-size: .9em }}
</style></head><body>
<h1>latentwatch release gate: <span class="{'pass' if report['passed'] else 'fail'} verdict">{verdict}</span></h1>
<table>
{info}
</table>
<h2>Checks</h2>
<table><tr><th>check</th><th>status</th><th>figure</th><th>value</th><th>bound</th><th>what it is</th></tr>
{''.join(rows)}
</table>
<p class="caveat">{e(report['caveat'])}</p>
</body></html>
"""
    path.write_text(body, encoding="utf-8")
    return path
