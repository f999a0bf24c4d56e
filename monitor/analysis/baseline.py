"""Baselines: reference distributions, fitted detectors and calibrated thresholds, in one file.

``build`` takes reference records (e.g. a file written by the tap's file sink) and the way they
group (``group_by``: documents, sessions, tenants, hours; :mod:`monitor.analysis.groups`). It
calibrates every threshold by *grouped cross-fit* (:mod:`monitor.analysis.calibration`): the groups
are split into ``folds``; for each fold the detectors are fitted on the other folds and no-drift
streams are simulated from the held-out fold only, so the thresholds see the variation between
groups that the next day's traffic brings. The detectors the analyzer runs are then fitted on all
reference records.

The file is a safetensors file (no pickle): the detectors' arrays plus a JSON metadata block (format
version, model fingerprint, sites and dims, probe checksums, configuration, detectors with their
thresholds, the calibration design and report) and a SHA-256 over all of it. Loading verifies the
checksum and format; the analyzer refuses a baseline made for another model, other sites or other
probes.
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
from monitor.analysis import calibration, detectors, naming, plausibility, signals
from monitor.analysis import groups as grouping
from monitor.analysis.detectors.projection import fit_pca
from monitor.probes.probe import ProbeSet

FORMAT = "latentwatch-baseline"
PSEUDO_GROUPS = 200  # per fold at most (calibration.pseudo_groups), and about PSEUDO_RECORDS records
PSEUDO_RECORDS = 20_000
VERSION = 3  # 2: grouped cross-fit calibration, out-of-sample pca_error, binomial concept rates; 3: concurrent_groups
READS = (2, 3)  # a v2 file is a v3 file with concurrent_groups 1


class BaselineError(ValueError):
    """A baseline that is corrupt, or made for another model, other sites or other probes."""


class AnalyzerConfig(BaseModel):
    """Which detectors run, on what windows, for which false-alarm budget."""

    model_config = ConfigDict(extra="forbid")
    window: int = Field(200, ge=10, le=100_000)
    stride: int = Field(50, ge=1, description="evaluate every `stride` records")
    univariate: list[Literal["ks", "psi", "wasserstein"]] = Field(default_factory=lambda: ["ks"])
    multivariate: list[Literal["mmd", "meanshift", "meanshift_full", "pca_error", "novelty"]] = Field(
        default_factory=lambda: ["mmd", "meanshift", "meanshift_full", "pca_error", "novelty"])
    concept_rates: bool = True
    pca_components: int = Field(16, ge=1, le=256)
    false_alarm_every: float = Field(20_000, gt=0, description="expected sampled records between false alarms")
    calibration_alarms: int = Field(150, ge=10, description="simulated alarms the calibration should rest on")
    max_calibration_evaluations: int = Field(300_000, ge=1000)
    group_by: str = Field("record", pattern=grouping.PATTERN,
                          description="what reference records belong together: meta:<key>, ts:<seconds> or record")
    concurrent_groups: int = Field(
        1, ge=1, le=100_000,
        description="groups whose records arrive interleaved: 1 when documents or hours follow one another; "
                    "for sessions or tenants served side by side, about how many are active at once")
    folds: int = Field(4, ge=2, le=20, description="cross-fit folds of whole groups")
    calibration_repeats: int = Field(1, ge=1, le=10, description="cross-fit repeats with other fold assignments")
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
        """Validate ``records``, group them by ``config.group_by`` and build (see :meth:`from_signals`)."""
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
        try:
            group_ids = grouping.assign(records, config.group_by)
        except grouping.GroupError as exc:
            raise BaselineError(str(exc)) from exc
        sig = signals.extract(records, shapes, probes)
        base = cls.from_signals(sig, group_ids, shapes, probes, config, model=first.model,
                                fingerprint=first.fingerprint)
        base.info["direction_exemplars"] = naming.direction_exemplars(base.slots, sig, [r.key for r in records])
        return base

    @classmethod
    def from_signals(cls, sig: dict[str, np.ndarray], group_ids: np.ndarray, shapes: dict[str, signals.SiteShape],
                     probes: ProbeSet | None, config: AnalyzerConfig, *, model: str, fingerprint: str) -> Baseline:
        """Fit and calibrate from signal families (``signals.extract``) and a group id per record."""
        n = len(group_ids)
        n_groups = len(np.unique(group_ids))
        k = config.folds
        if n_groups < 2 * k:
            raise BaselineError(
                f"{n_groups} groups by {config.group_by}: cross-fit calibration with {k} folds needs at least "
                f"{2 * k}; record traffic from more {_group_word(config.group_by)} or lower folds (>= 2)")
        warnings = []
        if config.group_by == "record":
            warnings.append(
                "group_by record: the budget holds only if live records are interchangeable with the baseline's; "
                "traffic that comes in documents, sessions, tenants or hours raises more false alarms than stated. "
                "Set group_by to meta:<key> or ts:<seconds>")
            if config.concurrent_groups > 1:
                warnings.append(f"concurrent_groups {config.concurrent_groups} has no effect with group_by record "
                                "(every record is its own group already)")
        elif n_groups < grouping.FEW_GROUPS:
            warnings.append(
                f"{n_groups} groups by {config.group_by}: the false-alarm budget covers only the variation between "
                f"these {n_groups}; record traffic from at least {grouping.FEW_GROUPS} {_group_word(config.group_by)}")
        if n < 100 * config.window:
            warnings.append(
                f"{n} reference records for window {config.window}: below 100 windows' worth, the finite reference "
                f"makes the real false-alarm rate differ from the budget; record more reference traffic or use a "
                f"smaller window")
        evaluations = int(min(config.max_calibration_evaluations,
                              max(2000, config.calibration_alarms * config.false_alarm_every / config.stride)))
        per_fold = max(500, evaluations // (k * config.calibration_repeats))
        t0 = time.perf_counter()
        grouped = config.group_by != "record"
        # two simulations per fold when grouped: the real held-out groups (their empirical spread, heavy
        # tails included) and pseudo-groups beyond them (a Gaussian tail past the largest); each is
        # calibrated to the budget and every detector keeps the higher of its two thresholds
        stats: dict[str, list[np.ndarray]] = {"groups": [], "pseudo_groups": []} if grouped else {"records": []}
        design = []
        for rep in range(config.calibration_repeats):
            fold = grouping.folds(group_ids, k, config.seed + 7919 * rep)
            for f in range(k):
                train, test = fold != f, fold == f
                slots = cls._fit_slots(signals.select(sig, train), group_ids[train], shapes, probes, config)
                held_out, held_groups = signals.select(sig, test), group_ids[test]
                streams = {"groups" if grouped else "records": (held_out, held_groups)}
                n_pseudo = 0
                if grouped:
                    rng = np.random.default_rng(config.seed + 17 + 31 * (rep * k + f))
                    size = max(1, int(test.sum()) // len(np.unique(held_groups)))
                    n_pseudo = int(min(PSEUDO_GROUPS, max(50, PSEUDO_RECORDS // size)))
                    streams["pseudo_groups"] = calibration.pseudo_groups(held_out, held_groups, n_pseudo, rng)
                for j, (kind, (pool_sig, pool_groups)) in enumerate(streams.items()):
                    pools = [slot.detector.transform(pool_sig[slot.family]) for slot in slots]
                    sim = calibration.simulate([s.detector for s in slots], pools, window=config.window,
                                               stride=config.stride, evaluations=max(500, per_fold // len(streams)),
                                               seed=config.seed + 1 + 31 * (rep * k + f) + 7 * j, groups=pool_groups,
                                               concurrent=config.concurrent_groups)
                    stats[kind].append(sim.stats)
                design.append({"repeat": rep, "fold": f, "groups": len(np.unique(group_ids[test])),
                               "records": int(test.sum()), "pseudo_groups": n_pseudo})
        sims = {kind: calibration.Simulation(np.concatenate(parts, axis=0), config.window, config.stride)
                for kind, parts in stats.items()}
        calibrated = {kind: calibration.calibrate(sim, config.false_alarm_every) for kind, sim in sims.items()}
        thresholds = np.max([th for th, _ in calibrated.values()], axis=0)
        if grouped:  # both stream kinds as the analyzer will run them: at the combined thresholds
            report = {kind: rep for kind, (_, rep) in calibrated.items()}
            report.update(calibration.summary(list(sims.values()), thresholds, config.false_alarm_every))
            report["per_detector_alpha"] = min(rep["per_detector_alpha"] for _, rep in calibrated.values())
        else:
            report = calibrated["records"][1]
        report["seconds"] = round(time.perf_counter() - t0, 2)
        slots = cls._fit_slots(sig, group_ids, shapes, probes, config)  # what the analyzer runs: all records
        for slot, th in zip(slots, thresholds, strict=True):
            slot.threshold = float(th)
        warnings += _resolution_warnings(report, n, n_groups, config, min(d["records"] for d in design))
        info = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "warnings": warnings,
            "records": int(n), "groups": int(n_groups),
            "calibration_design": {"method": "grouped cross-fit" + (" with pseudo-groups" if grouped else ""),
                                   "group_by": config.group_by, "folds": k, "repeats": config.calibration_repeats,
                                   "concurrent_groups": config.concurrent_groups,
                                   "groups": int(n_groups),
                                   "per_fold": design},
            "calibration": report,
            plausibility.INFO_KEY: plausibility.learn(sig),  # live values beyond are refused
        }
        if probes is not None:
            info["concept_base_rates"] = {
                c: float(r) for c, r in zip(probes.concepts, probes.above(sig["scores"]).mean(0), strict=True)}
        return cls(model, fingerprint, shapes, config, slots,
                   {p.concept: p.to_dict()["sha256"] for p in probes.probes} if probes else {}, info)

    @staticmethod
    def _fit_slots(sig: dict[str, np.ndarray], group_ids: np.ndarray, shapes: dict[str, signals.SiteShape],
                   probes: ProbeSet | None, config: AnalyzerConfig) -> list[DetectorSlot]:
        slots = []
        uni_families = [f for f in sig if f.split(":")[0] in ("scores", "attn", "norm")]
        for family in sorted(uni_families):
            shape = shapes.get(family.split(":", 1)[1]) if ":" in family else None
            names = signals.component_names(family, shape, probes)
            for test in config.univariate:
                det = detectors.REGISTRY[test]().fit(sig[family])
                slots.append(DetectorSlot(f"{test}:{family}", test, family, det, names))
        if config.concept_rates and probes is not None:
            det = detectors.ConceptRate(thresholds=probes.thresholds, concurrent_groups=config.concurrent_groups).fit(
                sig["scores"], group_ids if config.group_by != "record" else None)
            slots.append(DetectorSlot("rate:scores", "rate", "scores", det, list(probes.concepts)))
        spread = naming.logit_spread(sig["scores"], probes.concepts) if probes is not None and "scores" in sig else {}
        for family in sorted(f for f in sig if f.startswith("act:")):
            site = family.split(":", 1)[1]
            pca = fit_pca(sig[family], config.pca_components)  # one projection per site, shared
            # the concepts read at this site name the principal directions they are aligned with
            weights = {p.concept: p.weights for p in (probes.probes if probes else []) if p.site == site}
            for test in config.multivariate:
                det = detectors.REGISTRY[test](k=config.pca_components)
                # detectors that split the reference by group for out-of-sample moments fit their own basis
                shared = {"pca": pca} if getattr(det, "shares_pca", False) else {}
                det.fit(sig[family], groups=group_ids, **shared)
                names = det.component_names()
                found = naming.directions_of(det)
                if found is not None and weights:
                    names = naming.describe(names, found[0], found[1], weights, spread)
                slots.append(DetectorSlot(f"{test}:{site}", test, family, det, names))
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
            if meta.get("format") != FORMAT:
                raise BaselineError(f"{path}: not a latentwatch baseline (format {meta.get('format')!r})")
            if meta.get("version") not in READS:
                raise BaselineError(
                    f"{path}: baseline format v{meta.get('version')}, this build reads "
                    f"v{', v'.join(str(v) for v in READS)}"
                    + (" (v1 was calibrated without groups and cannot be converted)" if meta.get("version") == 1
                       else "")
                    + ": rebuild it from the reference records with `latentwatch baseline build`")
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


def _group_word(group_by: str) -> str:
    if group_by.startswith("ts:"):
        return f"time buckets of {group_by[3:]} s"
    if group_by.startswith("meta:"):
        return f"distinct {group_by[5:]} values"
    return "records"


def _resolution_warnings(report: dict[str, Any], n: int, n_groups: int, config: AnalyzerConfig,
                         smallest_fold: int) -> list[str]:
    """Warnings, with the numbers, when the baseline cannot support the stated budget."""
    out = []
    alpha = float(report["per_detector_alpha"])
    # each simulated stream kind is calibrated alone, so the smallest of them bounds the resolution
    kinds = [report[k] for k in ("groups", "pseudo_groups") if k in report] or [report]
    evaluations = min(int(r["evaluations"]) for r in kinds)
    windows = n / config.window
    if alpha * evaluations < 10:
        out.append(
            f"the budget (one false alarm per {config.false_alarm_every:,.0f} records) implies a per-detector level "
            f"of {alpha:.2g}, beyond what {evaluations:,} simulated evaluations resolve (fewer than 10 exceedances): "
            f"raise max_calibration_evaluations to {int(np.ceil(10 / alpha)):,} or the budget's records")
    if alpha * windows < 0.1:
        need = int(np.ceil(0.1 / alpha * config.window))
        out.append(
            f"the budget implies a per-detector level of {alpha:.2g}, i.e. thresholds far in the tail of "
            f"{windows:,.0f} windows' worth of reference records in {n_groups} groups: they extrapolate beyond what "
            f"the baseline shows; record about {need:,} reference records, or state a smaller budget")
    per_group = n / n_groups
    # with G exchangeable groups, about one new group in G + 1 lies beyond all of them, and the thresholds
    # can only be set from what the baseline shows; a group that fills much of a window can then raise an
    # alarm while it streams. Below one alarm per (G + 1) groups the budget asks for less than that.
    at_most = int(np.floor((n_groups + 1) * per_group))
    if config.group_by != "record" and per_group >= config.window / 2 and config.false_alarm_every > at_most:
        groups_per_alarm = config.false_alarm_every / per_group  # the budget, counted in groups
        out.append(
            f"the budget (one false alarm per {config.false_alarm_every:,.0f} records) is one per "
            f"{groups_per_alarm:,.0f} groups of ~{per_group:,.0f} records, but with {n_groups} baseline groups about "
            f"one new group in {n_groups + 1} is expected to lie beyond all of them, and each such group can raise "
            f"alarms (on several detectors) while it fills the window of {config.window}: about "
            f"{groups_per_alarm / (n_groups + 1):.1f}x the budget per alarm it raises. Record at least "
            f"{int(np.ceil(groups_per_alarm)):,} {_group_word(config.group_by)}, or loosen the budget to one false "
            f"alarm per {at_most:,} records at most")
    if smallest_fold < 2 * config.window:
        out.append(f"the smallest cross-fit fold holds {smallest_fold} records, under two windows of "
                   f"{config.window}: record more traffic per group or use fewer folds")
    return out


def _digest(meta: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta.encode())
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()
