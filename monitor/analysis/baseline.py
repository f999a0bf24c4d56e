"""Baselines: reference distributions, fitted detectors and calibrated thresholds, in one file.

``build`` takes reference records (e.g. a file written by the tap's file sink), splits them into a
*reference* part (40 %) that the detectors compare against and a *calibration pool* (60 %) from which
no-drift streams are resampled (:mod:`monitor.analysis.calibration`), fits every detector and sets every threshold
for the stated false-alarm budget.

The file is a safetensors file (no pickle): the detectors' arrays plus a JSON metadata block (format
version, model fingerprint, sites and dims, probe checksums, configuration, detectors with their
thresholds, calibration report) and a SHA-256 over all of it. Loading verifies the checksum and
format; the analyzer refuses a baseline made for another model, other sites or other probes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from collectors.record import Record
from monitor.analysis import calibration, detectors, plausibility, signals
from monitor.analysis.detectors.projection import fit_pca
from monitor.probes.probe import ProbeSet

FORMAT = "latentwatch-baseline"
VERSION = 1


class BaselineError(ValueError):
    """A baseline that is corrupt, or made for another model, other sites or other probes."""


class AnalyzerConfig(BaseModel):
    """Which detectors run, on what windows, for which false-alarm budget."""

    model_config = ConfigDict(extra="forbid")
    window: int = Field(200, ge=10, le=100_000)
    stride: int = Field(50, ge=1, description="evaluate every `stride` records")
    univariate: list[Literal["ks", "psi", "wasserstein"]] = Field(default_factory=lambda: ["ks"])
    multivariate: list[Literal["mmd", "meanshift", "pca_error"]] = Field(
        default_factory=lambda: ["mmd", "meanshift", "pca_error"])
    concept_rates: bool = True
    pca_components: int = Field(16, ge=1, le=256)
    false_alarm_every: float = Field(20_000, gt=0, description="expected sampled records between false alarms")
    calibration_alarms: int = Field(150, ge=10, description="simulated alarms the calibration should rest on")
    max_calibration_evaluations: int = Field(300_000, ge=1000)
    seed: int = 0


@dataclass
class DetectorSlot:
    """One detector as the analyzer runs it."""

    name: str  # e.g. "mmd:layers.19.resid", "ks:scores", "ks:attn:layers.29.attn"
    kind: str  # key of detectors.REGISTRY
    family: str  # signal family it reads
    detector: Any
    components: list[str]
    threshold: float = float("inf")


@dataclass
class Baseline:
    model: str
    fingerprint: str
    shapes: dict[str, signals.SiteShape]
    config: AnalyzerConfig
    slots: list[DetectorSlot]
    probes: dict[str, str]  # concept -> probe checksum
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, records: Sequence[Record], probes: ProbeSet | None, config: AnalyzerConfig | None = None,
              progress: Any = None) -> Baseline:
        config = config or AnalyzerConfig()
        if len(records) < 2 * config.window:
            raise BaselineError(f"need at least {2 * config.window} reference records for window "
                                f"{config.window}, got {len(records)}")
        first = records[0]
        shapes = signals.shapes_of(first)
        bad = [r for r in records if signals.invalid_reason(r, first.fingerprint, shapes, probes)]
        if bad:
            raise BaselineError(f"{len(bad)} of {len(records)} reference records are invalid (another model, "
                                f"other sites, a pooling the probes read but the records lack, or NaN): "
                                f"{signals.invalid_reason(bad[0], first.fingerprint, shapes, probes)}")
        if probes is not None:
            if probes.fingerprint != first.fingerprint:
                raise BaselineError(f"probes were trained on {probes.fingerprint}, records come from "
                                    f"{first.fingerprint}")
            missing = set(probes.needs()) - set(shapes)
            if missing:
                raise BaselineError(f"probes read sites the records do not carry: {sorted(missing)}")
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(records))
        half = int(len(records) * 0.4)  # reference 40 %, calibration pool 60 % (see docs/analyzer.md)
        ref_sig = signals.extract([records[i] for i in order[:half]], shapes, probes)
        cal_sig = signals.extract([records[i] for i in order[half:]], shapes, probes)
        slots = cls._fit_slots(ref_sig, shapes, probes, config)
        pools = [slot.detector.transform(cal_sig[slot.family]) for slot in slots]
        evaluations = int(min(config.max_calibration_evaluations,
                              max(2000, config.calibration_alarms * config.false_alarm_every / config.stride)))
        t0 = time.perf_counter()
        sim = calibration.simulate([s.detector for s in slots], pools, window=config.window, stride=config.stride,
                                   evaluations=evaluations, seed=config.seed + 1)
        thresholds, report = calibration.calibrate(sim, config.false_alarm_every)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        for slot, th in zip(slots, thresholds, strict=True):
            slot.threshold = float(th)
        warnings = []
        if len(records) < 100 * config.window:
            warnings.append(
                f"{len(records)} reference records for window {config.window}: below 100 windows' worth, the "
                f"finite reference makes the real false-alarm rate differ from the budget (usually fewer "
                f"alarms); record more reference traffic or use a smaller window")
        info = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "warnings": warnings,
            "reference_records": int(half), "calibration_records": int(len(records) - half),
            "calibration": report,
            plausibility.INFO_KEY: plausibility.learn(ref_sig, cal_sig),  # live values beyond are refused
        }
        if probes is not None:
            info["concept_base_rates"] = {
                c: float(r) for c, r in zip(probes.concepts, probes.above(ref_sig["scores"]).mean(0),
                                            strict=True)}
        return cls(first.model, first.fingerprint, shapes, config, slots,
                   {p.concept: p.to_dict()["sha256"] for p in probes.probes} if probes else {}, info)

    @staticmethod
    def _fit_slots(sig: dict[str, np.ndarray], shapes: dict[str, signals.SiteShape], probes: ProbeSet | None,
                   config: AnalyzerConfig) -> list[DetectorSlot]:
        slots = []
        uni_families = [f for f in sig if f.split(":")[0] in ("scores", "attn", "norm")]
        for family in sorted(uni_families):
            shape = shapes.get(family.split(":", 1)[1]) if ":" in family else None
            names = signals.component_names(family, shape, probes)
            for test in config.univariate:
                det = detectors.REGISTRY[test]().fit(sig[family])
                slots.append(DetectorSlot(f"{test}:{family}", test, family, det, names))
        if config.concept_rates and probes is not None:
            det = detectors.ConceptRate(thresholds=probes.thresholds).fit(sig["scores"])
            slots.append(DetectorSlot("rate:scores", "rate", "scores", det, list(probes.concepts)))
        for family in sorted(f for f in sig if f.startswith("act:")):
            site = family.split(":", 1)[1]
            pca = fit_pca(sig[family], config.pca_components)  # one projection per site, shared
            for test in config.multivariate:
                det = detectors.REGISTRY[test](k=config.pca_components).fit(sig[family], pca=pca)
                slots.append(DetectorSlot(f"{test}:{site}", test, family, det, det.component_names()))
        return slots

    # ------------------------------------------------------------------ file
    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model, "fingerprint": self.fingerprint,
            "sites": {s: {"kind": v.kind, "dim": v.dim} for s, v in self.shapes.items()},
            "config": self.config.model_dump(), "probes": self.probes, "info": self.info,
            "detectors": [{"name": s.name, "kind": s.kind, "family": s.family, "components": s.components,
                           "threshold": s.threshold} for s in self.slots],
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, slot in enumerate(self.slots):
            for key, arr in slot.detector.state().items():
                out[f"{i}/{key}"] = np.ascontiguousarray(np.asarray(arr, dtype=np.float64))
        return out

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = self._arrays()
        meta = json.dumps(self._meta(), sort_keys=True, allow_nan=False)
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp), metadata={"latentwatch": meta, "sha256": _digest(meta, arrays)})
        tmp.chmod(0o644)  # a sidecar container running as another user must be able to read it
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Baseline:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BaselineError(f"{path}: not a readable baseline file: {exc}") from exc
        meta_text = header.get("latentwatch")
        if meta_text is None:
            raise BaselineError(f"{path}: not a latentwatch baseline (no metadata)")
        if header.get("sha256") != _digest(meta_text, arrays):
            raise BaselineError(f"{path}: checksum mismatch: the baseline was modified or is corrupt")
        try:
            meta = json.loads(meta_text)
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise BaselineError(f"{path}: baseline format {meta.get('format')} v{meta.get('version')}, "
                                    f"this build reads {FORMAT} v{VERSION}")
            slots = []
            shared: dict[bytes, np.ndarray] = {}  # identical arrays (a site's shared PCA) load as one object
            for key, arr in list(arrays.items()):
                digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).digest()
                arrays[key] = shared.setdefault(digest, arr)
            for i, d in enumerate(meta["detectors"]):
                state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == str(i)}
                det = detectors.REGISTRY[d["kind"]].from_state(state)
                slots.append(DetectorSlot(d["name"], d["kind"], d["family"], det, d["components"], d["threshold"]))
            shapes = {s: signals.SiteShape(v["kind"], int(v["dim"])) for s, v in meta["sites"].items()}
            return cls(meta["model"], meta["fingerprint"], shapes, AnalyzerConfig(**meta["config"]), slots,
                       meta["probes"], meta["info"])
        except BaselineError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BaselineError(f"{path}: malformed baseline: {exc}") from exc

    def check_probes(self, probes: ProbeSet | None) -> None:
        """Refuse a probe set other than the one the baseline was built with."""
        have = {p.concept: p.to_dict()["sha256"] for p in probes.probes} if probes else {}
        if not have and self.probes:
            raise BaselineError(
                f"this baseline was built with probes {sorted(self.probes)}: give the probe folder it was built "
                "with (--probes, or `probes:` in the sidecar configuration)")
        if have != self.probes:
            changed = sorted(c for c in set(have) & set(self.probes) if have[c] != self.probes[c])
            raise BaselineError(
                f"baseline was built with probes {sorted(self.probes)}, loaded probes are {sorted(have)}"
                + (f" (retrained or edited since: {changed})" if changed else "")
                + "; rebuild the baseline with `latentwatch baseline build`")


def _digest(meta: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta.encode())
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()
