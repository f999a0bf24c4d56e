"""The ``latentwatch`` command.

User errors (a missing file, a corrupt or mismatched artifact, an invalid configuration) are one line on
stderr and exit code 2; anything else is one line and exit code 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from monitor import version

app = typer.Typer(help="latentwatch: drift monitoring for the internals of deployed transformer models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """Print ``error: message`` on stderr, the message taken literally (no markup)."""
    err_console.print(Text("error: ", style="red") + Text(str(message)), soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """A user error: one line on stderr, then exit ``code``."""
    error(message)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input is wrong, not the program (imported only when one is raised)."""
    from collectors.record import RecordError
    from collectors.sites import SiteError
    from monitor.analysis.baseline import BaselineError
    from monitor.probes.probe import ProbeError
    from monitor.sidecar.settings import ConfigError

    return (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, RecordError, SiteError,
            BaselineError, ProbeError, ConfigError)


def main() -> None:
    """Console entry point: ``latentwatch``."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except Exception as exc:
        if debug:
            raise
        user = isinstance(exc, _user_errors())
        error(str(exc) if user else f"internal error: {type(exc).__name__}: {exc} "
                                    "(run again with --debug for the traceback)")
        sys.exit(2 if user else 1)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"latentwatch {version()}")
        raise typer.Exit()


def require(extra: str, *modules: str) -> None:
    """Exit 2 with one line naming the extra to install when a module this command needs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"this command needs {', '.join(missing)}: pip install 'latentwatch[{extra}]'")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose or debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def sites(
    model: str = typer.Argument(..., help="smollm2, minilm, or a transformers model folder"),
    kind: str = typer.Option("", help="only sites of this kind: resid or attn"),
) -> None:
    """List the hook sites of MODEL with the module each one hooks."""
    require("tap", "torch", "transformers")
    from collectors import models
    from collectors.sites import available, default_sites

    loaded = models.load(model)
    defaults = set(default_sites(loaded.model))
    table = Table(title=f"sites of {loaded.name} ({loaded.kind})")
    for col in ("site", "kind", "module", "default"):
        table.add_column(col)
    for s in available(loaded.model):
        if kind and s.kind != kind:
            continue
        table.add_row(s.name, s.kind, s.module_path, "yes" if s.name in defaults else "")
    console.print(table)


@app.command()
def demo(
    model: str = typer.Option("smollm2", help="smollm2 or minilm"),
    out: Path = typer.Option(Path("latentwatch-out"), help="folder for the baseline, records and summary"),
    sample_rate: float = typer.Option(1.0, help="share of live requests the tap samples"),
    quick: bool = typer.Option(False, help="fewer texts and smaller windows (for CI)"),
    port: int = typer.Option(9464, help="port for /metrics while the demo runs (0: any free port)"),
) -> None:
    """The end-to-end run: real model, concept probes, a calibrated baseline, live traffic that shifts."""
    require("demo", "torch", "transformers", "sklearn", "matplotlib")
    from monitor.demo.run import run_demo

    summary = run_demo(model=model, out=out, sample_rate=sample_rate, quick=quick, console=console, port=port)
    console.print_json(json.dumps(summary))


@app.command()
def serve(
    config: Path = typer.Option(None, "--config", "-c", help="sidecar YAML (fields overridable by LATENTWATCH_*)"),
) -> None:
    """Run the sidecar: read records, analyze them, serve /metrics, /healthz, /readyz and POST /ingest."""
    from monitor.analysis.baseline import BaselineError
    from monitor.probes.probe import ProbeError
    from monitor.sidecar.service import JsonFormatter, install_excepthooks
    from monitor.sidecar.service import serve as run
    from monitor.sidecar.settings import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        fail(str(exc))
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    install_excepthooks()
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python logs every connection at INFO
    try:
        code = run(settings)
    except (BaselineError, ProbeError, ValueError, OSError) as exc:
        logging.getLogger("latentwatch.sidecar").error("cannot start: %s", exc)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


@app.command()
def replay(
    path: Path = typer.Argument(..., help="a recorded signature file"),
    url: str = typer.Option("http://127.0.0.1:9465/ingest", help="the sidecar's ingest URL (ingest.port)"),
    token_file: Path = typer.Option(None, help="file with the sidecar's ingest bearer token "
                                               "(default: $LATENTWATCH_INGEST_TOKEN)"),
    rate: float = typer.Option(0.0, help="records per second (0: as fast as possible)"),
    batch: int = typer.Option(100, help="records per request"),
    limit: int = typer.Option(None, help="stop after this many records"),
    skip: int = typer.Option(0, help="start after this many records"),
    kafka: str = typer.Option(None, help="bootstrap servers: write to Kafka instead of POSTing to --url"),
    topic: str = typer.Option("latentwatch.signatures", help="Kafka topic (with --kafka)"),
    retry_seconds: float = typer.Option(60.0, help="how long a body is retried (same Idempotency-Key) while "
                                                   "the sidecar is unreachable or restarting"),
) -> None:
    """Feed a recorded signature file to a running sidecar or a Kafka topic (to try alert rules, dashboards)."""
    import urllib.error

    from monitor.sidecar.replay import ReplayError
    from monitor.sidecar.replay import replay as run

    if not path.is_file():
        fail(f"{path}: no such signature file")
    token = os.environ.get("LATENTWATCH_INGEST_TOKEN")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            fail(f"cannot read the token file {token_file}: {exc.strerror}")
    sink = None
    if kafka:
        from collectors.kafka_sink import KafkaConnection, KafkaSink

        sink = KafkaSink(KafkaConnection(bootstrap_servers=kafka, topic=topic))
        if not sink.connected.wait(30):
            sink.close()
            fail(f"cannot reach Kafka at {kafka}: {sink.last_error}")
    try:
        result = run(path, url, rate, batch=batch, limit=limit, skip=skip, sink=sink, token=token,
                     retry_seconds=retry_seconds)
    except ReplayError as exc:
        fail(str(exc))
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the sidecar at {url}: {exc}")
    finally:
        if sink is not None:
            sink.close()
    console.print_json(json.dumps(result))
    if result["sent"] == 0 and skip == 0 and path.stat().st_size > 0:
        fail(f"{path}: not a signature file (no readable record in {path.stat().st_size} bytes)")


@app.command()
def report(
    records: Path = typer.Argument(..., help="a recorded signature file"),
    baseline: Path = typer.Option(..., help="baseline file"),
    probes: Path = typer.Option(None, help="folder of *.probe.json the baseline was built with"),
    shift_at: int = typer.Option(None, help="record index of a known shift (drawn on the plots)"),
    out: Path = typer.Option(Path("report.html"), help="HTML file to write"),
    explanation: list[Path] = typer.Option(None, "--explain", help="`latentwatch explain --json` output to include "
                                           "(repeatable)"),
) -> None:
    """Write the HTML drift report for a recorded stream against a baseline."""
    require("report", "matplotlib")
    from collectors.sinks import read_file
    from monitor.analysis.baseline import Baseline, BaselineError
    from monitor.ops.report import explanation_html, write_report
    from monitor.probes.probe import ProbeError, ProbeSet

    try:
        base = Baseline.load(baseline)
        probe_set = ProbeSet.load_dir(probes, fingerprint=base.fingerprint) if probes else None
        explained = []
        for path in explanation or []:
            try:
                body = json.loads(path.read_text(encoding="utf-8"))
                explanation_html(body)  # checked now, not after the records are read and plotted
            except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
                fail(f"{path}: not the JSON output of `latentwatch explain --json`: {exc}")
            explained.append(body)
        write_report(out, list(read_file(records)), base, probe_set, shift_at=shift_at, explanations=explained)
    except (BaselineError, ProbeError) as exc:
        fail(str(exc))
    console.print(f"wrote {out}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a signature file written by the file sink"),
    limit: int = typer.Option(3, help="records to print as JSON"),
) -> None:
    """Print a recorded signature file's records as JSON (arrays shortened) and count bad ones."""
    from collectors.sinks import FileReadStats, read_file

    stats = FileReadStats()
    for i, rec in enumerate(read_file(path, stats)):
        if i < limit:
            obj = rec.to_json()
            obj["sites"] = {s: {n: f"{len(v)} values" if isinstance(v, list) else v for n, v in d.items()}
                            for s, d in obj["sites"].items()}
            console.print_json(json.dumps(obj))
    console.print(f"{stats.records} records, {stats.corrupt} corrupt, "
                  f"{stats.truncated_tail_bytes} bytes of truncated tail")
    if stats.corrupt:
        raise typer.Exit(1)


@app.command()
def gate(
    model: str = typer.Option(..., "--model", help="the candidate: smollm2, minilm or a transformers folder"),
    suite: str = typer.Option(..., "--suite", help="a gate suite YAML, or builtin:<name> (builtin:smollm2)"),
    previous: Path = typer.Option(None, "--previous", help="the previous release's report.json (its folder holds "
                                  "the baseline the drift check compares with)"),
    out: Path = typer.Option(Path("gate-report"), help="folder for report.json, report.html, probes/, baseline"),
    strict: bool = typer.Option(False, help="a skipped check (no --previous) fails the gate"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
) -> None:
    """Release gate: run a suite of checks on a candidate model's internals; exit 1 if any fails.

    Exit codes: 0 passed, 1 a check failed, 2 a usage error (bad suite, unreadable previous report).
    """
    require("train", "torch", "transformers", "sklearn")
    from monitor.gate.report import print_report
    from monitor.gate.run import GateError, load_report, run_gate
    from monitor.gate.suite import SuiteError, load_suite

    try:
        loaded = load_suite(suite)
        if previous is not None:
            load_report(previous)  # before the long run: a wrong path fails in a second, not after training
            if out.resolve() == previous.resolve().parent:
                fail(f"--out {out} is the previous release's folder: this run would overwrite the baseline it "
                     "compares with; write to another folder")
        report = run_gate(loaded, model, out, previous=previous, strict=strict, progress=not as_json,
                          console=None if as_json else err_console)
    except (SuiteError, GateError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report, console)
        console.print(f"report: {out / 'report.html'} and {out / 'report.json'}", highlight=False)
    raise typer.Exit(0 if report["passed"] else 1)


@app.command()
def explain(
    texts: Path = typer.Argument(..., help="the alarmed window's requests: JSONL or CSV with a text field"),
    baseline: Path = typer.Option(..., help="the baseline the sidecar ran with"),
    probes: Path = typer.Option(None, help="the probe folder the sidecar ran with (if the baseline has probes)"),
    model: str = typer.Option("smollm2", help="the model the sidecar watched: smollm2, minilm or a folder"),
    detector: str = typer.Option(None, help="default: the detector most over its threshold on this window"),
    budget: int = typer.Option(5000, min=1, help="forward passes of one text, at most"),
    layers_back: int = typer.Option(2, min=0, help="also ablate components of this many layers before the site"),
    ablation: str = typer.Option("zero", help="zero, or mean (the component's mean output over --reference)"),
    reference: Path = typer.Option(None, help="texts like the baseline's traffic, for --ablation mean"),
    text_field: str = typer.Option("text", help="the field holding the text"),
    max_length: int = typer.Option(128, min=1, help="tokens per text, as the tap truncated them"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Which attention heads and MLPs an alarm rests on: ablate each near the alarmed site and re-measure."""
    require("train", "torch", "transformers")
    from collectors import models
    from monitor.analysis.baseline import Baseline
    from monitor.ops.explain import ExplainError
    from monitor.ops.explain import explain as run_explain
    from monitor.probes.concepts import SourceSpec
    from monitor.probes.probe import ProbeSet

    def read(path: Path) -> list[str]:
        try:
            return [t.text for t in SourceSpec(source="file", path=str(path), text_field=text_field).load()]
        except ValueError as exc:
            fail(str(exc))

    base = Baseline.load(baseline)
    probe_set = ProbeSet.load_dir(probes, fingerprint=base.fingerprint) if probes else None
    base.check_probes(probe_set)
    window = read(texts)
    ref = read(reference) if reference else None
    lm = models.load(model)
    try:
        result = run_explain(lm, window, base, probe_set, detector=detector, budget=budget, layers_back=layers_back,
                             ablation=ablation, reference_texts=ref, max_length=max_length)
    except ExplainError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    console.print(f"{result['detector']} on {result['window']} texts: statistic {result['statistic']:.4g}, "
                  f"{result['ratio']:.2f}x its threshold ({'in alarm' if result['in_alarm'] else 'not in alarm'}); "
                  f"{result['ablation']}-ablated {result['components_tried']} of {result['components_near_site']} "
                  f"components of layers {result['layers']}", highlight=False)
    table = Table(title="what the statistic does with one component ablated (interventional)")
    for col in ("component", "ratio after", "change", "concept score change"):
        table.add_column(col, justify="left" if col in ("component", "concept score change") else "right")
    for r in result["singles"][:10]:
        moved = ", ".join(f"{k} {v:+.3f}" for k, v in sorted(r["concept_change"].items(), key=lambda kv: -abs(kv[1]))
                          [:2])
        table.add_row(r["component"], f"{r['ratio']:.2f}", f"{r['change']:+.2f}", moved)
    console.print(table)
    if result["pairs"]:
        console.print("pairs whose joint effect differs most from the sum of their single effects:")
        for p in result["pairs"][:5]:
            console.print(f"  {' + '.join(p['components'])}: ratio {p['ratio']:.2f}, interaction "
                          f"{p['interaction']:+.2f}", highlight=False)
    if not result["statistic_moved"]:
        console.print("no single ablation moved the statistic by 1 % of its threshold: the shift does not run "
                      "through one of these components"
                      + (f"; ranked by the change of {result['concept']}'s score instead" if result["concept"] else ""),
                      highlight=False)
    if result["restoring_pairs"]:
        console.print("ablating both of a pair brings the window under the threshold: "
                      + "; ".join(" + ".join(p) for p in result["restoring_pairs"]), highlight=False)
    if result["restoring"]:
        console.print(f"ablating any one of these brings the window under the threshold: "
                      f"{', '.join(result['restoring'])}", highlight=False)
    console.print(f"{result['forward_passes']} forward passes (budget {result['budget']}), {result['seconds']:.0f} s. "
                  f"{result['caveat']}", highlight=False)


probes_app = typer.Typer(help="Train, evaluate and inspect concept probes.", no_args_is_help=True)
app.add_typer(probes_app, name="probes")


@probes_app.command("train")
def probes_train(
    specs: list[Path] = typer.Argument(None, help="concept spec YAML files (see docs/probes.md)"),
    builtin: bool = typer.Option(False, "--builtin", help="train the built-in concept pack"),
    model: str = typer.Option("smollm2", help="smollm2, minilm or a transformers folder"),
    out: Path = typer.Option(None, help="output folder (default: the model's pack folder in the cache)"),
    max_per_source: int = typer.Option(None, help="cap texts per source (default: the spec's)"),
    site: str = typer.Option(None, help="train at this site instead of choosing the best"),
    search_layers: bool = typer.Option(False, help="choose among every third layer, not the default sites"),
) -> None:
    """Train one probe per concept spec and save it with its probe card."""
    require("train", "torch", "transformers", "sklearn")
    from collectors import models
    from collectors.fingerprint import fingerprint
    from monitor.probes.concepts import builtin_specs, load_spec
    from monitor.probes.train import pack_dir, train_specs

    try:
        loaded_specs = (builtin_specs() if builtin else []) + [load_spec(p) for p in specs or []]
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not loaded_specs:
        fail("give spec files or --builtin")
    lm = models.load(model)
    out = out or pack_dir(fingerprint(lm.model), loaded_specs, max_per_source=max_per_source)
    probes = train_specs(loaded_specs, lm, out, max_per_source=max_per_source, site=site,
                         search_layers=search_layers)
    _print_cards([p.card for p in probes])
    console.print(f"saved {len(probes)} probes to {out}")


@probes_app.command("show")
def probes_show(folder: Path = typer.Argument(..., help="folder of *.probe.json files")) -> None:
    """Print the probe cards of a folder."""
    from monitor.probes.probe import ProbeError, ProbeSet

    try:
        probe_set = ProbeSet.load_dir(folder)
    except ProbeError as exc:
        fail(str(exc))
    _print_cards([p.card for p in probe_set.probes])


@probes_app.command("eval")
def probes_eval(
    probe: Path = typer.Argument(..., help="a *.probe.json file"),
    file: Path = typer.Option(None, help="labelled CSV or JSONL file (with --positive)"),
    ordinary: Path = typer.Option(None, help="CSV or JSONL sample of your own ordinary traffic: will it fire?"),
    label_field: str = typer.Option("label", help="field holding the label"),
    positive: list[str] = typer.Option(None, help="label value(s) meaning the concept is present"),
    text_field: str = typer.Option("text", help="field holding the text"),
    target_fpr: float = typer.Option(0.01, help="with --ordinary: propose a threshold for this share"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
    model: str = typer.Option("smollm2", help="the model the probe was trained on"),
) -> None:
    """Score a labelled file (--file, --positive) or a sample of ordinary traffic (--ordinary) with a probe
    and compare with its card; exit 1 when quality dropped or the probe fires on the ordinary traffic."""
    require("train", "torch", "transformers", "sklearn")
    import numpy as np

    from collectors import models
    from monitor.probes.activations import FeatureCache
    from monitor.probes.concepts import SourceSpec
    from monitor.probes.probe import Probe, ProbeError
    from monitor.probes.train import evaluate, evaluate_ordinary

    if (file is None) == (ordinary is None):
        fail("give either --file (labelled, with --positive) or --ordinary (a sample of ordinary traffic)")
    if file is not None and not positive:
        fail("--file needs --positive: the label value(s) meaning the concept is present")
    if not 0 < target_fpr < 0.5:
        fail(f"--target-fpr must be between 0 and 0.5, got {target_fpr}")
    lm = models.load(model)
    cache = FeatureCache(lm)
    try:
        p = Probe.load(probe, fingerprint=cache.fingerprint)
        rows = SourceSpec(source="file", path=str(file or ordinary), text_field=text_field).load()
    except (ProbeError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not rows:
        fail(f"{file or ordinary}: no texts in field {text_field!r}")
    if ordinary is not None:
        result = evaluate_ordinary(p, lm, cache, [t.text for t in rows], target_fpr=target_fpr,
                                   progress=not as_json)
    else:
        missing = [i for i, t in enumerate(rows, 1) if label_field not in t.labels]
        if missing:
            fail(f"rows {missing[:5]} have no field {label_field!r}")
        labels = np.array([int(t.labels[label_field] in positive) for t in rows])
        if labels.min() == labels.max():
            fail(f"need both classes; labels {positive} matched {labels.sum()} of {len(rows)}")
        result = evaluate(p, lm, cache, [t.text for t in rows], labels, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result))
    elif ordinary is not None:
        _print_ordinary(result)
    else:
        console.print_json(json.dumps(result))
    if "warning" in result:
        if not as_json:
            warn(result["warning"])
        raise typer.Exit(1)


def _print_ordinary(r: dict) -> None:
    ci = r["ci95"]
    console.print(f"{r['concept']} ({r['site']}/{r['pooling']}, threshold {r['threshold']:.4f}): "
                  f"{r['above_threshold']} of {r['n']} ordinary texts at or above the threshold = "
                  f"{r['above_threshold_rate']:.1%} (95 % interval {ci[0]:.1%}-{ci[1]:.1%}); "
                  f"the card's worst held-out ordinary source: "
                  f"{_fmt(r['card_max_ordinary_above_threshold_rate'], True)}")
    table = Table(title="by input length (tokens)")
    for col in ("length", "n", "above threshold", "95 % interval"):
        table.add_column(col)
    for name, v in r["by_length"].items():
        table.add_row(name, str(v["n"]), f"{v['above_threshold_rate']:.1%}", f"{v['ci95'][0]:.1%}-{v['ci95'][1]:.1%}")
    console.print(table)
    console.print(f"proposed threshold for {r['target_fpr']:.1%} on this sample: {r['proposed_threshold']:.4f} "
                  f"({r['proposed_threshold_note']})")
    console.print(f"[dim]{r['caveat']}[/dim]")


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def _print_cards(cards: list[dict]) -> None:
    from rich.markup import escape  # source labels hold [filters], which rich would read as markup

    table = Table(title="probe cards (leave-one-source-out figures; threshold set at the card's target FPR on "
                        "held-out ordinary sources)")
    for col in ("concept", "site/pooling", "threshold", "worst ordinary source above thr (upper 95 %)",
                "LOSO AUROC", "recall @thr / 1 % / 0.1 % FPR", "held-out families recall", "ECE", "control",
                "cross-source AUROC"):
        table.add_column(col)
    for c in cards:
        cross = escape(", ".join(f"{k}: {_fmt(v.get('auroc'))}" for k, v in c.get("cross_source", {}).items()))
        if "ordinary_sources" not in c:  # a card from before leave-one-source-out thresholds
            h = c.get("held_out", {})
            table.add_row(c["concept"], f"{c['site']}/{c['pooling']}", _fmt(c.get("threshold")), "-",
                          _fmt(h.get("auroc")), "-", "-", _fmt(h.get("ece")),
                          _fmt(c.get("shuffled_label_control_auroc")), cross or "-")
            continue
        worst_name, worst = max(c["ordinary_sources"].items(), key=lambda kv: kv[1]["above_threshold_rate"])
        upper = max(v["ci95"][1] for v in c["ordinary_sources"].values())
        r = c["recall"]
        fams = escape(", ".join(f"{k}: {_fmt(v['above_threshold_rate'], True)}"
                                for k, v in c.get("held_out_positive", {}).items()))
        table.add_row(c["concept"], f"{c['site']}/{c['pooling']}", _fmt(c["threshold"]),
                      f"{_fmt(worst['above_threshold_rate'], True)} {escape(worst_name)} ({_fmt(upper, True)})",
                      _fmt(c["loso_auroc"]),
                      f"{_fmt(r['at_threshold']['above_threshold_rate'], True)} / {_fmt(r['at_1pct_fpr'], True)} / "
                      f"{_fmt(r['at_0.1pct_fpr'], True)}",
                      fams or "-", _fmt(c.get("ece")), _fmt(c.get("shuffled_label_control_auroc")), cross or "-")
    console.print(table)
    if cards:
        console.print(f"[dim]{cards[0]['caveat']}[/dim]")


baseline_app = typer.Typer(help="Build and inspect baselines.", no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")


def false_alarm_budget(every: float | None, days: float | None, sampled_per_second: float | None) -> float:
    """Records between false alarms, from a record count or from days at a sampled traffic rate."""
    if days is not None:
        if not sampled_per_second:
            raise typer.BadParameter("--false-alarm-days needs --sampled-per-second")
        return days * 86_400 * sampled_per_second
    return every if every is not None else 20_000


@baseline_app.command("build")
def baseline_build(
    records: list[Path] = typer.Argument(..., help="reference signature files (file sink output)"),
    out: Path = typer.Option(Path("baseline.safetensors"), help="baseline file to write"),
    probes: Path = typer.Option(None, help="folder of *.probe.json (concept scores and rates)"),
    window: int = typer.Option(200, help="records per detector window"),
    stride: int = typer.Option(50, help="evaluate every STRIDE records"),
    false_alarm_every: float = typer.Option(None, help="expected sampled records between false alarms"),
    false_alarm_days: float = typer.Option(None, help="...or expected days between false alarms"),
    sampled_per_second: float = typer.Option(None, help="sampled records per second (with --false-alarm-days)"),
    univariate: list[str] = typer.Option(["ks"], help="ks, psi and/or wasserstein"),
    group_by: str = typer.Option("record", help="which records belong together: meta:<key> (a metadata key such "
                                 "as tenant, doc, session), ts:<seconds> (time buckets) or record (each alone)"),
    folds: int = typer.Option(4, help="cross-fit calibration folds of whole groups"),
    concurrent_groups: int = typer.Option(1, help="groups served side by side: 1 when documents or hours follow "
                                          "one another; for sessions or tenants, about how many are open at once"),
) -> None:
    """Build a baseline from reference records and calibrate every detector to the false-alarm budget.

    Thresholds are calibrated by grouped cross-fit: detectors fitted on some groups, no-drift streams
    simulated from the others, so the budget holds on traffic from groups the baseline never saw."""
    from pydantic import ValidationError

    from collectors.sinks import FileReadStats, read_file
    from monitor.analysis.baseline import AnalyzerConfig, Baseline, BaselineError
    from monitor.probes.probe import ProbeError, ProbeSet

    try:
        config = AnalyzerConfig(window=window, stride=stride, univariate=univariate, group_by=group_by, folds=folds,
                                concurrent_groups=concurrent_groups,
                                false_alarm_every=false_alarm_budget(false_alarm_every, false_alarm_days,
                                                                     sampled_per_second))
    except ValidationError as exc:
        fail(str(exc))
    recs, stats = [], FileReadStats()
    for path in records:
        recs += list(read_file(path, stats))
    if stats.corrupt:
        warn(f"skipped {stats.corrupt} corrupt records")
    try:
        probe_set = ProbeSet.load_dir(probes, fingerprint=recs[0].fingerprint if recs else None) if probes else None
        from monitor.progress import step

        with step(err_console, f"calibrating {len(recs)} records for one false alarm per "
                               f"{config.false_alarm_every:,.0f} records"):
            base = Baseline.build(recs, probe_set, config)
    except (BaselineError, ProbeError) as exc:
        fail(str(exc))
    base.save(out)
    _print_baseline(base)
    console.print(f"wrote {out}")


@baseline_app.command("show")
def baseline_show(path: Path = typer.Argument(..., help="a baseline file")) -> None:
    """Print a baseline's detectors, thresholds and calibration."""
    from monitor.analysis.baseline import Baseline, BaselineError

    try:
        base = Baseline.load(path)
    except BaselineError as exc:
        fail(str(exc))
    _print_baseline(base)


def _print_baseline(base) -> None:
    cal = base.info["calibration"]
    design = base.info.get("calibration_design", {})
    console.print(f"model {base.model} ({base.fingerprint}); {base.info['records']} reference records in "
                  f"{base.info['groups']} groups (group_by {base.config.group_by}); window {base.config.window}, "
                  f"stride {base.config.stride}; {design.get('method', '')} over {design.get('folds', '?')} folds")
    console.print(f"false-alarm budget: one per {cal['target_records_between_false_alarms']:,.0f} records; "
                  f"simulated {cal['simulated_records_between_false_alarms']:,} "
                  f"(from {cal['simulated_alarms']} simulated alarms, "
                  f"±{100 * (cal['relative_standard_error'] or 0):.0f} %)")
    for warning in base.info.get("warnings", []):
        warn(warning)
    table = Table()
    for col in ("detector", "threshold", "components"):
        table.add_column(col)
    for s in base.slots:
        comps = ", ".join(s.components[:4]) + (f", … ({len(s.components)})" if len(s.components) > 4 else "")
        table.add_row(s.name, f"{s.threshold:.4g}", comps)
    console.print(table)


alerts_app = typer.Typer(help="Prometheus alert and recording rules.", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("build")
def alerts_build(
    out: Path = typer.Option(Path("alerts/latentwatch.rules.yml"), help="Prometheus rule file to write"),
    crd: Path = typer.Option(Path("deploy/kubernetes/prometheusrule.yaml"),
                             help="the same rules as a Prometheus Operator PrometheusRule"),
    runbook_base: str = typer.Option(None, help="URL prefix of docs/runbooks (default: the project's)"),
    grafana_url: str = typer.Option(None, help="Grafana's URL, for each alert's dashboard_url "
                                               "(default: http://localhost:3000)"),
) -> None:
    """Write the rule file and the PrometheusRule from monitor/ops/rules.py."""
    from monitor.ops import rules

    for path in rules.write(out, crd, runbook_base or rules.RUNBOOK_BASE, grafana_url or rules.GRAFANA_URL):
        console.print(f"wrote {path}")


dashboards_app = typer.Typer(help="Grafana dashboards (built with grafana-foundation-sdk).", no_args_is_help=True)
app.add_typer(dashboards_app, name="dashboards")


@dashboards_app.command("build")
def dashboards_build(out: Path = typer.Option(Path("dashboards"), help="folder for the dashboard JSON files")) -> None:
    """Write the Overview, Concepts and Internals dashboards as JSON."""
    require("grafana", "grafana_foundation_sdk")
    from monitor.ops import dashboards

    for path in dashboards.write(out):
        console.print(f"wrote {path}")


@dashboards_app.command("push")
def dashboards_push(
    url: str = typer.Option(..., envvar="GRAFANA_URL", help="Grafana base URL, e.g. https://grafana.example.com"),
    token: str = typer.Option(None, envvar="GRAFANA_TOKEN", help="service account token (or user:pass in the URL)"),
    folder_uid: str = typer.Option(None, help="folder to put the dashboards in"),
) -> None:
    """Create or overwrite the dashboards in a Grafana (grafana-client)."""
    require("grafana", "grafana_foundation_sdk", "grafana_client")
    from monitor.ops import dashboards

    try:
        answers = dashboards.push(url, token, dashboards.build_all(), folder_uid)
    except Exception as exc:  # connection refused, 401, 412...: say which, exit 2
        fail(f"pushing to {url} failed: {exc}")
    for answer in answers:
        console.print(f"{answer.get('status', 'ok')}: {answer.get('url', answer.get('uid', ''))}")


audit_app = typer.Typer(help="Verify and export the audit trail (docs/audit.md).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _audit_key(key_file: Path | None) -> bytes | None:
    if key_file is not None:
        try:
            return key_file.read_bytes().strip()
        except OSError as exc:
            fail(f"cannot read the audit key file {key_file}: {exc.strerror}")
    value = os.environ.get("LATENTWATCH_AUDIT_KEY")
    return value.strip().encode() if value else None


def _when(value: str | None, option: str) -> float | None:
    """ISO 8601 (``2026-06-01``, ``2026-06-01T12:00:00+00:00``; UTC when no zone) or Unix seconds."""
    if value is None:
        return None
    import datetime as dt

    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option} {value!r}: not an ISO 8601 date/time or Unix seconds")
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


@audit_app.command("verify")
def audit_verify(
    folder: Path = typer.Argument(..., help="the audit folder (audit.dir)"),
    key_file: Path = typer.Option(None, help="the audit key (default: $LATENTWATCH_AUDIT_KEY); "
                                             "without it the checkpoints' MACs are not checked"),
    expect_seq: int = typer.Option(None, help="a checkpoint seq known from outside (Prometheus' "
                                              "latentwatch_audit_checkpoint_seq): a cut tail is detected"),
    as_json: bool = typer.Option(False, "--json", help="the result as one JSON object"),
) -> None:
    """Check the chain, the checkpoints and HEAD; name the first bad entry and exit 1 on any problem."""
    from monitor.audit.verify import verify

    if not folder.is_dir():
        fail(f"{folder}: no such audit folder")
    res = verify(folder, key=_audit_key(key_file), expect_seq=expect_seq)
    if as_json:
        console.print_json(json.dumps(res.to_dict()))
    else:
        for w in res.warnings:
            err_console.print(f"warning: {w}")
        if res.ok:
            console.print(f"ok: entries {res.first_seq}..{res.last_seq} in {res.segments} segments, "
                          f"{res.checkpoints} checkpoints (newest {res.last_checkpoint_seq})")
    if not res.ok:
        fail(f"audit trail does not verify: {res.problems[0]}", code=1)


@audit_app.command("export")
def audit_export(
    folder: Path = typer.Argument(..., help="the audit folder (audit.dir)"),
    out: Path = typer.Option(..., help="file to write"),
    since: str = typer.Option(None, help="first time included (ISO 8601 or Unix seconds)"),
    until: str = typer.Option(None, help="first time excluded"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, or parquet (needs pyarrow)"),
    key_file: Path = typer.Option(None, help="the audit key (default: $LATENTWATCH_AUDIT_KEY)"),
) -> None:
    """Verify the trail, then write its entries in a time range for an auditor (nothing if it does not verify)."""
    from monitor.audit.trail import AuditError
    from monitor.audit.verify import export

    if not folder.is_dir():
        fail(f"{folder}: no such audit folder")
    try:
        result = export(folder, out, _when(since, "--since"), _when(until, "--until"), key=_audit_key(key_file),
                        fmt=fmt)
    except AuditError as exc:
        fail(str(exc), code=1)
    console.print_json(json.dumps({k: v for k, v in result.items() if k != "verified"}))
