"""The streaming analyzer: live records in, drift statistics, alarms and attribution out.

Per record the analyzer validates it (another model's fingerprint, wrong sites or dimensions, NaN or
infinity: counted by reason and skipped, never mixed into the state), extracts its signals, and
appends each detector's transformed view of it to that detector's ring buffer of ``window`` rows.
Every ``stride`` records each detector is evaluated on its window and compared with its calibrated
threshold. Memory is fixed (window × detector width); the cost per record is O(window / stride)
vectorized work, and records are processed in batches.

An alarm *fires* when a detector's statistic first exceeds its threshold and *clears* when it drops
back; every firing is logged with an attribution: the components that moved most (concepts,
attention heads and statistics, principal directions), so an on-call person knows what drifted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from collectors.record import Record
from monitor.analysis import plausibility, signals
from monitor.analysis.baseline import Baseline, DetectorSlot
from monitor.probes.probe import ProbeSet

log = logging.getLogger(__name__)
OOD_SUFFIX = "(probe out of domain)"  # appended to attribution entries naming a concept whose probe is invalid now


@dataclass
class DetectorState:
    slot: DetectorSlot
    buffer: np.ndarray  # [window, width] ring buffer of transformed rows
    total: np.ndarray | None = None  # running column sums of the buffer (mean-based detectors)
    value: float = float("nan")
    alarm: bool = False
    alarms_total: int = 0
    last_fired_at: int | None = None  # record count when the last alarm fired


@dataclass
class AlarmEvent:
    detector: str
    at_record: int
    statistic: float
    threshold: float
    attribution: list[tuple[str, float]]
    exemplars: list[str] = field(default_factory=list)  # hashed keys of the window's records farthest along the move

    def describe(self) -> str:
        top = ", ".join(f"{name} {value:+.3g}" for name, value in self.attribution[:5])
        farthest = f"; farthest records: {', '.join(self.exemplars)}" if self.exemplars else ""
        return (f"DRIFT {self.detector}: statistic {self.statistic:.4g} > threshold {self.threshold:.4g} "
                f"({self.statistic / self.threshold if self.threshold > 0 else float('inf'):.1f}x) at record "
                f"{self.at_record}; moved most: {top}{farthest}")


@dataclass
class AnalyzerStats:
    records_total: int = 0
    invalid_total: Counter = field(default_factory=Counter)  # by reason
    evaluations_total: int = 0


class Analyzer:
    """Compare a live stream of records with ``baseline`` (and score concepts with ``probes``)."""

    def __init__(self, baseline: Baseline, probes: ProbeSet | None = None, *, log_alarms: bool = True) -> None:
        baseline.check_probes(probes)
        if probes is not None and probes.fingerprint != baseline.fingerprint:
            raise ValueError("probes and baseline were made for different models")
        self.baseline = baseline
        self.probes = probes
        self.log_alarms = log_alarms
        self.window = baseline.config.window
        self.stride = baseline.config.stride
        self.stats = AnalyzerStats()
        self.states: list[DetectorState] = []
        self._filled = 0
        self._pos = 0
        self._seen_valid = 0
        self.concept_hits = np.zeros(len(probes.concepts)) if probes else np.zeros(0)
        self.scored_total = 0
        self.last_scores: np.ndarray | None = None
        self.last_outcomes: list[str | None] = []  # per record of the last update(): None or why refused
        self.last_row_reasons: list[str | None] = []
        # probe validity (issue 13): the last `validity_window` scores per concept, for the window-median logit
        self._validity_refs = [p.validity for p in probes.probes] if probes else []
        self.validity_window = max((r.window for r in self._validity_refs if r is not None), default=0)
        self._score_buf = np.full((self.validity_window, len(self._validity_refs)), np.nan, dtype=np.float32)
        self._score_pos = 0
        # the hashed key of the record in each window slot ("" when fed plain arrays): alarms name exemplars
        self._keys = np.full(self.window, "", dtype=object)
        # valid rows not yet in the windows: the per-record detector transforms wait for the next evaluation
        # point and then run once on all of them (one record per update() would otherwise pay every
        # transform's fixed cost per record); readers of the windows flush them first
        self._pending: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        self._pending_n = 0
        self._families = sorted({slot.family for slot in baseline.slots})

    @property
    def valid_seen(self) -> int:
        """Valid records analyzed so far; an alarm's ``at_record`` is the ordinal of the record it fired on."""
        return self._seen_valid + self._pending_n

    # ------------------------------------------------------------------ ingestion
    def update(self, records: Sequence[Record]) -> list[AlarmEvent]:
        """Analyze a batch of records; returns the alarms that fired in it. ``last_outcomes`` then holds, per
        record of the batch, None (analyzed; its scores are the rows of ``last_scores``, in order) or the
        reason it was refused."""
        self.stats.records_total += len(records)
        fp = self.baseline.fingerprint
        outcomes: list[str | None] = [None if r.fingerprint == fp else "fingerprint" for r in records]
        self.last_outcomes = outcomes
        self.last_scores = None
        idx = [i for i, o in enumerate(outcomes) if o is None]
        if len(idx) < len(records):
            self.stats.invalid_total["fingerprint"] += len(records) - len(idx)
        if not idx:
            return []
        try:  # fast path: the whole batch has the expected sites and dims
            sig = signals.extract([records[i] for i in idx], self.baseline.shapes, self.probes)
        except (KeyError, ValueError, AttributeError):
            good = []
            for i in idx:
                reason = signals.invalid_reason(records[i], fp, self.baseline.shapes, self.probes)
                if reason is None:
                    good.append(i)
                else:
                    outcomes[i] = reason
                    self.stats.invalid_total[reason] += 1
            idx = good
            if not idx:
                return []
            sig = signals.extract([records[i] for i in idx], self.baseline.shapes, self.probes)
        fired = self.update_signals(sig, keys=[records[i].key for i in idx])
        for i, reason in zip(idx, self.last_row_reasons, strict=True):
            outcomes[i] = reason
        return fired

    def update_signals(self, sig: dict[str, np.ndarray], keys: Sequence[str] | None = None) -> list[AlarmEvent]:
        """Analyze signal families (``signals.extract`` of valid records, or plain arrays); returns new alarms.
        ``keys`` (one per row, optional) are the records' hashed keys, for the alarms' exemplars.

        Rows with NaN, infinity or implausible values are counted by reason and skipped
        (``last_row_reasons``: per input row, None or the reason).
        """
        finite = signals.finite_rows(sig)
        reasons: list[str | None] = [None if f else "nonfinite" for f in finite]
        self.last_row_reasons = reasons
        self.last_scores = None
        keys = np.array(keys, dtype=object) if keys is not None and len(keys) == len(finite) else None
        if not finite.all():
            self.stats.invalid_total["nonfinite"] += int((~finite).sum())
            sig = signals.select(sig, finite)
            keys = keys[finite] if keys is not None else None
            if not finite.any():
                return []
        plausible = plausibility.plausible_rows(sig, self.baseline.info.get(plausibility.INFO_KEY, {}))
        if not plausible.all():  # finite but far beyond the baseline: one such row must not blind a detector
            self.stats.invalid_total["implausible"] += int((~plausible).sum())
            for row, ok in zip(np.flatnonzero(finite), plausible, strict=True):
                if not ok:
                    reasons[row] = "implausible"
            sig = signals.select(sig, plausible)
            keys = keys[plausible] if keys is not None else None
            if not plausible.any():
                return []
        n = int(plausible.sum())
        if "scores" in sig:
            self.last_scores = sig["scores"]
            self.concept_hits += self.probes.above(sig["scores"]).sum(axis=0)
            self.scored_total += n
            self._push_scores(sig["scores"])
        self._ensure_states(sig)
        pending = self._pending_n + n
        waits = pending < self.stride and self._seen_valid + pending < self._next_evaluation()
        # what the detectors read (a missing family fails here, on the batch that lacks it); copies only for
        # rows that wait beyond this call, since the caller may refill its arrays
        self._pending.append(({f: np.array(sig[f]) if waits else sig[f] for f in self._families},
                              keys if keys is not None else np.full(n, "", dtype=object)))
        self._pending_n = pending
        return [] if waits else self._flush()

    def _next_evaluation(self) -> int:
        """The valid-record count at which the windows are next evaluated (a stride multiple, window full)."""
        after = (self._seen_valid // self.stride + 1) * self.stride
        return max(after, -(-self.window // self.stride) * self.stride)

    def _flush(self) -> list[AlarmEvent]:
        """Transform every pending row in one batch into the detectors' windows; ``_push`` evaluates where
        due. Rows whose transform fails are counted (``invalid_total["transform"]``) and dropped, so one
        bad batch cannot wedge every later update or reader; the error is raised."""
        if not self._pending:
            return []
        if len(self._pending) == 1:
            sig, keys = self._pending[0]
        else:
            sig = {f: np.concatenate([p[0][f] for p in self._pending]) for f in self._families}
            keys = np.concatenate([p[1] for p in self._pending])
        n = self._pending_n
        self._pending, self._pending_n = [], 0
        try:
            cache: dict = {}  # detectors of one site share its PCA projection
            rows = [st.slot.detector.transform(sig[st.slot.family], cache) for st in self.states]
        except Exception:
            self.stats.invalid_total["transform"] += n
            raise
        return self._push(rows, n, keys)

    def _ensure_states(self, sig: dict[str, np.ndarray]) -> list[DetectorState]:
        if not self.states:
            for slot in self.baseline.slots:
                width = slot.detector.transform(sig[slot.family][:1]).shape[1]
                mean_based = hasattr(slot.detector, "statistic_from_mean")
                self.states.append(DetectorState(slot, np.zeros((self.window, width)),
                                                 np.zeros(width) if mean_based else None))
        return self.states

    def _push(self, rows: list[np.ndarray], n: int, keys: np.ndarray) -> list[AlarmEvent]:
        fired: list[AlarmEvent] = []
        i = 0
        while i < n:
            # records until the next evaluation point (a multiple of stride once the window is full)
            take = min(n - i, self.stride - self._seen_valid % self.stride)
            idx = (self._pos + np.arange(take)) % self.window
            for st, r in zip(self.states, rows, strict=True):
                new = r[i : i + take]
                st.buffer[idx] = new
            self._keys[idx] = keys[i : i + take]
            self._pos = (self._pos + take) % self.window
            self._filled = min(self.window, self._filled + take)
            self._seen_valid += take
            i += take
            if self._seen_valid % self.stride == 0 and self._filled == self.window:
                fired += self._evaluate()
        return fired

    def _evaluate(self) -> list[AlarmEvent]:
        self.stats.evaluations_total += 1
        fired = []
        for st in self.states:
            if st.total is not None:
                # summed afresh at every evaluation (pairwise, O(window x width)): a running sum loses the
                # small values' digits after one huge row passes through it, for as long as it keeps running
                st.total = st.buffer.sum(axis=0)
                value = float(st.slot.detector.statistic_from_mean((st.total / self.window)[None], self.window)[0])
            else:
                value = float(st.slot.detector.statistic(st.buffer[None])[0])
            st.value = value
            above = value > st.slot.threshold
            if above and not st.alarm:
                st.alarms_total += 1
                st.last_fired_at = self._seen_valid
                event = AlarmEvent(st.slot.name, self._seen_valid, value, st.slot.threshold, self.attribution(st),
                                   self.exemplars(st))
                fired.append(event)
                if self.log_alarms:
                    log.warning("%s", event.describe())
            elif st.alarm and not above:
                log.info("cleared %s: statistic %.4g <= threshold %.4g", st.slot.name, value, st.slot.threshold)
            st.alarm = above
        return fired

    # ------------------------------------------------------------------ reading
    def window_means(self) -> Iterator[tuple[DetectorState, np.ndarray, np.ndarray]]:
        """For univariate KS detectors: (state, window mean, baseline mean) per component."""
        self._flush()
        if not self._filled:
            return
        for st in self.states:
            reference = getattr(st.slot.detector, "reference_", None)
            if st.slot.kind == "ks" and reference is not None:
                yield st, st.buffer[: self._filled].mean(axis=0), reference.mean(axis=0)

    def attribution(self, st: DetectorState, top: int = 5) -> list[tuple[str, float]]:
        """The components of one detector's current window that moved most (largest |contribution|)."""
        self._flush()
        comps = np.asarray(st.slot.detector.components(st.buffer), dtype=np.float64)
        names = st.slot.components or [f"c{j}" for j in range(len(comps))]
        order = np.argsort(-np.abs(comps))[:top]
        ood = self.out_of_domain() if st.slot.family == "scores" else set()
        return [(f"{names[j]} {OOD_SUFFIX}" if names[j] in ood else names[j], float(comps[j])) for j in order]

    def exemplars(self, st: DetectorState, top: int = 3) -> list[str]:
        """Hashed keys of the window's records that sit farthest along what moved, as each detector sees it:
        the window's mean displacement in whitened principal coordinates (``mmd``, ``meanshift``; centred
        activations for ``meanshift_full``), the largest per-record residual (``pca_error``) or novelty,
        the records hitting the surging concept (``rate``), or the farthest values of the component that
        moved most (univariate tests). Empty when the analyzer was fed plain arrays."""
        self._flush()
        filled = self._filled
        if not filled:
            return []
        buf, keys = st.buffer[:filled], self._keys[:filled]
        det, kind = st.slot.detector, st.slot.kind
        if kind in ("pca_error", "novelty"):
            score = buf[:, 0]
        elif kind in ("mmd", "meanshift", "meanshift_full"):
            z = buf[:, det.features:] if kind == "mmd" else buf
            d = z.mean(axis=0)
            score = z @ (d / (np.linalg.norm(d) or 1.0))
        elif kind == "rate":  # the records hitting the concept that surged most
            j = int(np.argmax(np.asarray(det.components(st.buffer), dtype=np.float64)))
            score = buf[:, j]
        else:  # the univariate tests: the component that moved most
            j = int(np.argmax(np.abs(np.asarray(det.components(st.buffer), dtype=np.float64))))
            col = buf[:, j]
            ref = getattr(det, "reference_", None)
            center = float(np.median(ref[:, j])) if ref is not None else float(np.median(col))
            moved = col.mean() - center
            score = (col - center) * (1.0 if moved >= 0 else -1.0)
        order = np.argsort(-score, kind="stable")
        return [str(keys[i]) for i in order if keys[i]][:top]

    def ranking(self, top: int = 10) -> list[tuple[str, str, float]]:
        """Across detectors in alarm: ``(detector, component, contribution)`` ranked by statistic/threshold."""
        alarmed = sorted((st for st in self.states if st.alarm),
                         key=lambda st: -(st.value / st.slot.threshold if st.slot.threshold > 0 else np.inf))
        out = []
        for st in alarmed:
            out += [(st.slot.name, name, value) for name, value in self.attribution(st, top=3)]
        return out[:top]

    def concept_surge(self) -> tuple[dict[str, float], float] | None:
        """Per concept, the current window's ``−log10`` binomial tail (``rate:scores`` components), and the
        detector's calibrated threshold; None without a rate detector. NaN until the window is full."""
        self._flush()
        for st in self.states:
            if st.slot.kind == "rate":
                full = self._filled == self.window
                values = st.slot.detector.components(st.buffer) if full else np.full(len(st.slot.components), np.nan)
                return dict(zip(st.slot.components, map(float, values), strict=True)), st.slot.threshold
        return None

    # ------------------------------------------------------------------ probe validity
    def _push_scores(self, scores: np.ndarray) -> None:
        if not self.validity_window:
            return
        tail = scores[-self.validity_window:]
        idx = (self._score_pos + np.arange(len(tail))) % self.validity_window
        self._score_buf[idx] = tail
        self._score_pos = int((self._score_pos + len(tail)) % self.validity_window)

    def _recent_scores(self) -> np.ndarray:
        """The validity watch's ring of scores in arrival order, oldest first (NaN rows: not yet filled)."""
        return np.roll(self._score_buf, -self._score_pos, axis=0)

    def probe_validity(self) -> dict[str, tuple[float, float]]:
        """``{concept: (ratio, threshold)}`` for probes with a validity reference; ratio > threshold (1.0)
        says the probe is out of its domain on current traffic (its window-median logit is beyond what
        held-out negatives reach, see monitor/probes/validity.py). NaN until a window of scores arrived."""
        if self.probes is None:
            return {}
        out = {}
        recent = self._recent_scores()
        for j, (concept, ref) in enumerate(zip(self.probes.concepts, self._validity_refs, strict=True)):
            if ref is None:
                continue
            col = recent[:, j]
            col = col[np.isfinite(col)][-ref.window:]  # the newest ref.window scores
            if len(col) < ref.window:
                out[concept] = (float("nan"), 1.0)
                continue
            p = np.clip(np.median(col.astype(np.float64)), 1e-7, 1 - 1e-7)
            out[concept] = (ref.logit_ratio(np.array([np.log(p / (1 - p))])), 1.0)
        return out

    def out_of_domain(self) -> set[str]:
        """Concepts whose probe is currently out of its domain (validity ratio above its threshold)."""
        return {c for c, (r, t) in self.probe_validity().items() if r > t}

    def concept_rates(self) -> dict[str, float]:
        """Share of scored records above each concept's threshold since start."""
        if self.probes is None or not self.scored_total:
            return {}
        return {c: float(h / self.scored_total) for c, h in zip(self.probes.concepts, self.concept_hits, strict=True)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything a restart needs to continue exactly: (JSON-ready fields, arrays)."""
        self._flush()
        meta = {"records_total": self.stats.records_total, "invalid_total": dict(self.stats.invalid_total),
                "evaluations_total": self.stats.evaluations_total, "filled": self._filled, "pos": self._pos,
                "seen_valid": self._seen_valid, "scored_total": self.scored_total,
                "detectors": [{"name": st.slot.name, "value": st.value if np.isfinite(st.value) else None,
                               "alarm": st.alarm, "alarms_total": st.alarms_total,
                               "last_fired_at": st.last_fired_at, "mean_based": st.total is not None}
                              for st in self.states]}
        arrays = {f"detector/{i}": st.buffer for i, st in enumerate(self.states)}
        arrays["concept_hits"] = np.asarray(self.concept_hits, dtype=np.float64)
        arrays["window_keys"] = _encode_keys(self._keys)
        if self.validity_window:  # the last scores of the validity watch, oldest first
            arrays["validity_scores"] = self._recent_scores()
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_dict` (for the same baseline: the caller checks its checksum)."""
        names = [slot.name for slot in self.baseline.slots]
        if meta["detectors"] and [d["name"] for d in meta["detectors"]] != names:
            raise ValueError("checkpoint detectors do not match the baseline's")
        states = []
        for i, (slot, d) in enumerate(zip(self.baseline.slots, meta["detectors"], strict=False)):
            buffer = np.array(arrays[f"detector/{i}"], dtype=np.float64)
            if buffer.shape[0] != self.window:
                raise ValueError(f"checkpoint window {buffer.shape[0]} != baseline window {self.window}")
            st = DetectorState(slot, buffer, np.zeros(buffer.shape[1]) if d["mean_based"] else None)
            st.value = float("nan") if d["value"] is None else float(d["value"])
            st.alarm, st.alarms_total, st.last_fired_at = bool(d["alarm"]), int(d["alarms_total"]), d["last_fired_at"]
            states.append(st)
        self.states = states
        self._pending, self._pending_n = [], 0
        self.stats.records_total = int(meta["records_total"])
        self.stats.invalid_total = Counter({k: int(v) for k, v in meta["invalid_total"].items()})
        self.stats.evaluations_total = int(meta["evaluations_total"])
        self._filled, self._pos, self._seen_valid = int(meta["filled"]), int(meta["pos"]), int(meta["seen_valid"])
        self.scored_total = int(meta["scored_total"])
        if "window_keys" in arrays and arrays["window_keys"].shape[0] == self.window:  # older checkpoints: none
            self._keys = _decode_keys(arrays["window_keys"])
        if len(self.concept_hits):
            self.concept_hits = np.array(arrays["concept_hits"], dtype=np.float64)
        saved = arrays.get("validity_scores")
        if self.validity_window and saved is not None and saved.shape == self._score_buf.shape:
            self._score_buf, self._score_pos = np.array(saved, dtype=np.float32), 0  # older checkpoints: refill


_KEY_BYTES = 200  # record keys are at most 200 ASCII characters (collectors/record.py)


def _encode_keys(keys: np.ndarray) -> np.ndarray:
    """Window keys as a ``[window, 200]`` uint8 array (checkpoint arrays are numeric)."""
    out = np.zeros((len(keys), _KEY_BYTES), dtype=np.uint8)
    for i, k in enumerate(keys):
        b = str(k).encode("ascii", "replace")[:_KEY_BYTES]
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def _decode_keys(arr: np.ndarray) -> np.ndarray:
    return np.array([bytes(row).rstrip(b"\0").decode("ascii", "replace") for row in np.asarray(arr, np.uint8)],
                    dtype=object)
