"""``latentwatch demo``: real text through a real model with the tap attached.

This first version shows the collection side end to end: ordinary English dialog, then a shift to
prompt-injection attempts, run through SmolLM2 in batches with the tap sampling requests; the
signatures are written to a file with the file sink and summarised per site (how far the live window's
mean pooled activation moved from the reference window, in units of the reference spread).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from collectors import FileSink, Tap, read_file
from collectors import models as model_zoo
from monitor import corpora


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_demo(model: str, out: Path, sample_rate: float, quick: bool, console: Console) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    console.print(f"loading {model} ...")
    lm = model_zoo.load(model)
    lm.tokenizer.padding_side = "left" if lm.kind == "causal-lm" else "right"
    n = 48 if quick else 240
    reference = corpora.sample(corpora.dialog("english"), n, seed=1)
    live_normal = corpora.sample(corpora.dialog("english"), n // 2, seed=2)
    attacks = [t for t in corpora.injections() if t.labels["label"] == "malicious"]
    live_shift = corpora.sample(attacks, n // 2, seed=3)
    phases = [("reference", reference), ("live-normal", live_normal), ("live-shifted", live_shift)]

    out.mkdir(parents=True, exist_ok=True)
    path = out / "signatures.lwsr"
    path.unlink(missing_ok=True)
    sink = FileSink(path)
    from collectors.sites import default_sites

    sites = default_sites(lm.model)
    attn_site = sites[-1].replace(".resid", ".attn")
    with Tap(lm.model, [*sites, attn_site], sink=sink, sample_rate=sample_rate, model_name=lm.name,
             metadata={"replica": "demo-0"}) as tap:
        for phase, texts in phases:
            for batch in track(list(_batches(texts, 8)), description=f"{phase:>13}", console=console):
                enc = lm.tokenizer([t.text for t in batch], return_tensors="pt", padding=True,
                                   truncation=True, max_length=96)
                keys = [f"{phase}-{t.source}-{hash(t.text)}" for t in batch]
                with tap.request(keys=keys, metadata={"route": phase}), torch.no_grad():
                    lm.model(**enc)
        tap.flush()
        stats = tap.stats
    sink.close()

    by_phase: dict[str, list] = {}
    for rec in read_file(path):
        by_phase.setdefault(rec.meta["route"], []).append(rec)
    table = Table(title="shift of mean pooled activation vs reference (z-units of the reference spread)")
    table.add_column("site")
    for phase, _ in phases[1:]:
        table.add_column(phase, justify="right")
    shift = {}
    for site in sites:
        ref = np.stack([r.sites[site]["mean"] for r in by_phase.get("reference", [])])
        mu, sd = ref.mean(0), ref.std(0) + 1e-6
        row = []
        for phase, _ in phases[1:]:
            live = np.stack([r.sites[site]["mean"] for r in by_phase.get(phase, [])])
            z = float(np.sqrt(np.mean(((live.mean(0) - mu) / sd) ** 2)) * np.sqrt(len(live)))
            shift[f"{site}/{phase}"] = round(z, 2)
            row.append(f"{z:.2f}")
        table.add_row(site, *row)
    console.print(table)
    return {
        "model": lm.name,
        "records": sum(len(v) for v in by_phase.values()),
        "file": str(path),
        "tap": vars(stats),
        "shift_z": shift,
        "seconds": round(time.perf_counter() - t0, 1),
    }
