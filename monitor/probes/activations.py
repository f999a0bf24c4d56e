"""Run texts through a model with the tap attached and collect pooled activations per site.

Used to train and evaluate probes and to build reference data. Features are cached on disk per model
fingerprint, truncation length and site, keyed by a hash of the text, so a text that several
concepts share runs through the model once.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import numpy as np
import torch

from collectors import QueueSink, Tap
from collectors.models import LoadedModel, cache_dir
from collectors.record import Record
from monitor.probes.probe import POOLINGS
from monitor.progress import progress as progress_display

FEATURES_VERSION = 2  # bump when the tap's pooled arrays change (2: wmax added); old caches are not reused


def text_key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def run_texts(
    lm: LoadedModel,
    texts: list[str],
    sites: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    description: str = "model forward",
    progress: bool = True,
) -> list[Record]:
    """One record per text (in input order), captured by a tap at ``sites`` with every request sampled."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with little padding
    sink = QueueSink(maxsize=len(texts) + 1)
    tok = lm.tokenizer
    tok.padding_side = "right"
    by_key: dict[str, Record] = {}
    # signatures need no logits: a causal LM computes them for the last position only (~20 % less work)
    extra = {"logits_to_keep": 1} if lm.kind == "causal-lm" else {}
    # every text is sampled and records are looked up by the run's own hashed keys, so the salt matters to
    # nothing outside this call: a fresh random one per run (never $LATENTWATCH_TAP_SALT, and no
    # serving-side warning about a missing deployment salt)
    with Tap(lm.model, sites, sink=sink, sample_rate=1.0, queue_size=4, model_name=lm.name,
             salt=secrets.token_bytes(32)) as tap, \
            progress_display(enabled=progress) as bar:
        task = bar.add_task(description, total=len(texts))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [texts[i] for i in idx]
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            with tap.request(keys=[text_key(t) for t in batch]), torch.no_grad():
                lm.model(**enc, **extra)
            for rec in sink.drain():
                by_key[rec.key] = rec
            bar.advance(task, len(idx))
        tap.flush()
        for rec in sink.drain():
            by_key[rec.key] = rec
        if tap.stats.dropped_queue_full or tap.stats.worker_errors or tap.stats.hook_errors:
            raise RuntimeError(f"tap lost records while extracting features: {tap.stats}")
    return [by_key[tap.sampler.hashed_key(text_key(t))] for t in texts]


class FeatureCache:
    """Pooled features per (model fingerprint, max_length, site, pooling), keyed by text hash."""

    def __init__(self, lm: LoadedModel, max_length: int = 128, root: Path | None = None) -> None:
        self.lm = lm
        self.max_length = max_length
        from collectors.fingerprint import fingerprint

        self.fingerprint = fingerprint(lm.model)
        self.root = ((root or cache_dir() / "features") / self.fingerprint.replace(":", "-")
                     / f"len{max_length}-v{FEATURES_VERSION}")
        self._mem: dict[str, dict[str, np.ndarray]] = {}

    def _path(self, site: str) -> Path:
        return self.root / f"{site}.npz"

    def _load(self, site: str) -> dict[str, np.ndarray]:
        if site not in self._mem:
            path = self._path(site)
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    self._mem[site] = {k: z[k] for k in z.files}
            else:
                self._mem[site] = {"keys": np.array([], dtype="U24")}
        return self._mem[site]

    def get(self, texts: list[str], sites: list[str], *, progress: bool = True,
            description: str = "model forward") -> dict[str, dict[str, np.ndarray]]:
        """``{site: {pooling: [n, d]}}`` for ``texts``, every pooling of :data:`POOLINGS` (runs the model on the
        missing ones)."""
        keys = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for site in sites:
            have = set(self._load(site)["keys"].tolist())
            for k, t in zip(keys, texts, strict=True):
                if k not in have:
                    missing[k] = t
        if missing:
            todo = list(missing.values())
            recs = run_texts(self.lm, todo, sites, max_length=self.max_length, progress=progress,
                             description=description)
            self.root.mkdir(parents=True, exist_ok=True)
            new_keys = np.array([text_key(t) for t in todo])
            for site in sites:
                store = self._load(site)
                known = set(store["keys"].tolist())
                fresh = np.array([k not in known for k in new_keys.tolist()])
                if not fresh.any():
                    continue
                merged = {"keys": np.concatenate([store["keys"], new_keys[fresh]])}
                for p in POOLINGS:
                    add = np.stack([r.sites[site][p] for r, f in zip(recs, fresh, strict=True) if f])
                    merged[p] = add if p not in store else np.concatenate([store[p], add])
                self._mem[site] = merged
                tmp = self._path(site).with_suffix(".tmp.npz")
                np.savez(tmp, **merged)
                tmp.replace(self._path(site))
        out: dict[str, dict[str, np.ndarray]] = {}
        for site in sites:
            store = self._load(site)
            pos = {k: i for i, k in enumerate(store["keys"].tolist())}
            rows = np.array([pos[k] for k in keys], dtype=np.int64)
            out[site] = {p: store[p][rows] for p in POOLINGS}
        return out


def cached_records(lm: LoadedModel, texts: list[str], sites: list[str], tag: str, *, max_length: int = 48,
                   progress: bool = True) -> list[Record]:
    """Records for ``texts`` (in order), computed once and kept in ``<cache>/records/<fingerprint>/``."""
    from collectors.fingerprint import fingerprint
    from collectors.sinks import FileSink, read_file

    folder = cache_dir() / "records" / fingerprint(lm.model).replace(":", "-")
    sites_hash = hashlib.blake2b(','.join(sites).encode(), digest_size=4).hexdigest()
    path = folder / f"{tag}-len{max_length}-{sites_hash}-v{FEATURES_VERSION}.lwsr"
    have: dict[str, Record] = {}
    if path.exists():
        have = {r.meta.get("text_key", ""): r for r in read_file(path)}
    missing = list(dict.fromkeys(t for t in texts if text_key(t) not in have))
    if missing:
        recs = run_texts(lm, missing, sites, max_length=max_length, description=tag, progress=progress)
        with FileSink(path, max_bytes=None) as sink:  # a cache file: never rotated
            for t, r in zip(missing, recs, strict=True):
                r.meta = {"text_key": text_key(t)}
                sink.write(r)
                have[text_key(t)] = r
    return [have[text_key(t)] for t in texts]
