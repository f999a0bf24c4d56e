"""The in-process tap: hooks on a model that turn sampled requests into records.

Usage::

    from collectors import Tap, QueueSink
    sink = QueueSink()
    with Tap(model, ["layers.9.resid", "layers.9.attn"], sink=sink, sample_rate=0.1) as tap:
        with tap.request(keys=["req-17", "req-18"]):   # optional: stable keys make sampling deterministic
            model(**batch)
        tap.flush()
    records = sink.drain()

What happens per forward:

1. A pre-hook on the model decides which rows of the batch are sampled (:class:`Sampler`, keyed on
   the request key). If none is, or the work queue is full (then the rows are counted as dropped),
   every other hook returns at once.
2. Hooks on the chosen sites copy the sampled rows of their output (``index_select`` + ``clone``);
   attention sites copy the post-RoPE queries and keys handed to the attention kernel
   (:mod:`collectors.attention`). Nothing else is done in the forward pass.
3. A post-hook puts the capture on a bounded queue without waiting. A background thread reduces
   it to signatures (:mod:`collectors.signature`) and writes :class:`~collectors.record.Record` s
   to the sink.

Every hook body is guarded: an exception is counted (``hook_errors``) and logged, never raised into the
model. :meth:`Tap.detach` removes every hook and restores the attention implementation, so the model
computes exactly what it computed before.

**generate()**: a request's signature describes how the model read the *prompt*: it is taken from the
prefill forward (the one that starts with an empty KV cache). Decode steps, which extend a cache by one
token, are recognised and skipped (``decode_steps_skipped``), so a request yields one record however many
tokens it generates.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from collectors import attention
from collectors.fingerprint import fingerprint
from collectors.record import _META_KEY, Record
from collectors.sampling import Sampler, deployment_salt
from collectors.signature import attention_heads, pool_activations
from collectors.sinks import Sink
from collectors.sites import Site, SiteError, default_sites, resolve

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class TapStats:
    """Monotonic counters (exported by the monitor as ``latentwatch_tap_*_total``)."""

    forwards: int = 0
    requests_seen: int = 0
    requests_sampled: int = 0
    records_emitted: int = 0
    dropped_queue_full: int = 0
    decode_steps_skipped: int = 0
    hook_errors: int = 0
    worker_errors: int = 0
    sink_errors: int = 0
    metadata_rejected: int = 0
    worker_busy_seconds: float = 0.0
    hook_seconds: float = 0.0  # time spent inside the tap's hooks, on the serving thread


@dataclass
class _Request:
    keys: Sequence[str] | None
    texts: Sequence[str] | None
    meta: dict[str, str]


@dataclass
class _Capture:
    rows: torch.Tensor
    mask: torch.Tensor
    keys: list[str]
    texts: list[str] | None
    meta: dict[str, str]
    ts: float
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    attn: dict[str, attention.AttentionCapture] = field(default_factory=dict)


class Tap:
    """Hook ``model`` at ``sites`` and emit one record per sampled request to ``sink``.

    Args:
        model: a ``transformers`` causal LM or encoder, or any ``torch.nn.Module`` (sites by module path).
        sites: site names (see :mod:`collectors.sites`); default: three residual-stream sites.
        sink: where records go (:class:`~collectors.sinks.QueueSink`, :class:`~collectors.sinks.FileSink`,
            a Kafka sink...). Required.
        sample_rate: share of requests to sample, decided by a keyed hash of the request key.
        model_name: the ``model_name`` label records carry (default: from the model's config).
        metadata: bounded static metadata put on every record (``replica`` defaults to the host name).
            Records also carry the tap's cumulative ``tap_sampled``, ``tap_dropped`` and ``sink_dropped`` counters.
        queue_size: captures waiting for the worker; beyond it sampled requests are dropped and counted.
        keep_text: copy request texts given to :meth:`request` into records. Off by default: raw text
            never leaves the serving process unless the operator turns this on.
        salt: key for hashing request keys; default ``$LATENTWATCH_TAP_SALT`` (one secret per deployment: every
            replica samples the same keys), else random per process (see :func:`~collectors.sampling.deployment_salt`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sites: Sequence[str] | None = None,
        *,
        sink: Sink,
        sample_rate: float = 0.1,
        model_name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        queue_size: int = 32,
        keep_text: bool = False,
        salt: bytes | str | None = None,
    ) -> None:
        self.model = model
        self.site_names = list(sites) if sites else default_sites(model)
        self.sink = sink
        self.sampler = Sampler(sample_rate, deployment_salt(salt))
        self.model_name = model_name or _default_name(model)
        self.keep_text = keep_text
        self.stats = TapStats()
        self.metadata = self._clean_meta({"replica": socket.gethostname()[:64], **(metadata or {})})
        self.sites: list[Site] = [resolve(model, s) for s in self.site_names]
        self.fingerprint: str = ""
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._local = threading.local()
        self._handles: list = []
        self._attn_modules: list[torch.nn.Module] = []
        self._saved_attn_impl: str | None = None
        self._worker: threading.Thread | None = None
        self._counter = itertools.count()
        self._arg_names = list(inspect.signature(model.forward).parameters)
        self._last_error_log = 0.0

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Tap:
        """Register the hooks and start the worker. Idempotent."""
        if self.attached:
            return self
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.model)
        attn_sites = [s for s in self.sites if s.kind == "attn"]
        if attn_sites:
            config = getattr(self.model, "config", None)
            impl = getattr(config, "_attn_implementation", None)
            if config is None or impl is None:
                raise SiteError("attention sites need a transformers model that uses AttentionInterface")
            if not impl.startswith(attention.PREFIX):
                self._saved_attn_impl = impl
                config._attn_implementation = attention.wrapped_name(impl)
        timed = self._timed
        self._handles.append(self.model.register_forward_pre_hook(timed(self._pre_hook), with_kwargs=True))
        for site in self.sites:
            module = self.model.get_submodule(site.module_path)
            if site.kind == "attn":
                attention._OBSERVERS[module] = timed(self._make_attn_observer(site.name))
                self._attn_modules.append(module)
            else:
                self._handles.append(module.register_forward_hook(timed(self._make_act_hook(site.name))))
        self._handles.append(self.model.register_forward_hook(timed(self._post_hook), with_kwargs=True))
        self._worker = threading.Thread(target=self._run, name="latentwatch-tap", daemon=True)
        self._worker.start()
        return self

    def detach(self, timeout: float = 30.0) -> None:
        """Remove every hook, finish queued work (up to ``timeout`` s), stop the worker, flush the sink."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._attn_modules:
            attention._OBSERVERS.pop(module, None)
        self._attn_modules.clear()
        if self._saved_attn_impl is not None:
            self.model.config._attn_implementation = self._saved_attn_impl
            self._saved_attn_impl = None
        if self._worker is not None:
            self.flush(timeout)
            self._queue.put(_STOP)
            self._worker.join(timeout)
            self._worker = None

    def __enter__(self) -> Tap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued capture has been written; flush the sink. False on timeout."""
        deadline = time.monotonic() + timeout
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        try:
            self.sink.flush()
        except Exception:
            self._count_error("sink_errors", "sink flush failed")
        return True

    # ------------------------------------------------------------------ request context
    @contextmanager
    def request(
        self,
        keys: Sequence[str] | None = None,
        *,
        texts: Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[None]:
        """Give the next forwards in this thread request keys (one per batch row), texts and metadata.

        Keys drive deterministic sampling and are hashed before they leave the process. Texts are
        only kept when the tap was built with ``keep_text=True``. Invalid metadata entries are
        dropped and counted (``metadata_rejected``), never raised.
        """
        prev = getattr(self._local, "request", None)
        self._local.request = _Request(
            list(keys) if keys is not None else None,
            list(texts) if texts is not None and self.keep_text else None,
            self._clean_meta(metadata or {}),
        )
        try:
            yield
        finally:
            self._local.request = prev

    def _clean_meta(self, meta: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for k, v in meta.items():
            # three of the 16 metadata slots carry the tap's own counters (tap_sampled, tap_dropped,
            # sink_dropped)
            if (isinstance(k, str) and _META_KEY.match(k) and not k.startswith(("tap_", "sink_"))
                    and isinstance(v, str) and len(v) <= 128 and len(out) < 13):
                out[k] = v
            else:
                self.stats.metadata_rejected += 1
        return out

    # ------------------------------------------------------------------ hooks (forward path)
    def _timed(self, hook):
        """Wrap a hook so its time on the serving thread adds up in ``stats.hook_seconds``."""
        stats, clock = self.stats, time.perf_counter

        def timed(*args, **kwargs):
            started = clock()
            try:
                return hook(*args, **kwargs)
            finally:
                stats.hook_seconds += clock() - started

        return timed

    def _count_error(self, counter: str, what: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        now = time.monotonic()
        if now - self._last_error_log > 10.0:  # at most one traceback per 10 s
            self._last_error_log = now
            log.exception("latentwatch tap: %s (counted in %s=%d)", what, counter, getattr(self.stats, counter))

    def _arg(self, name: str, args: tuple, kwargs: dict) -> object:
        if name in kwargs:
            return kwargs[name]
        try:
            i = self._arg_names.index(name)
        except ValueError:
            return None
        return args[i] if i < len(args) else None

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.cap = None
        try:
            self.stats.forwards += 1
            ids = self._arg("input_ids", args, kwargs)
            if ids is None:
                ids = self._arg("inputs_embeds", args, kwargs)
            if ids is None and args and isinstance(args[0], torch.Tensor):
                ids = args[0]
            if not isinstance(ids, torch.Tensor):
                return
            if _is_decode_step(self._arg("past_key_values", args, kwargs), self._arg("cache_position", args, kwargs)):
                self.stats.decode_steps_skipped += 1
                return
            batch, length = ids.shape[0], ids.shape[1]
            req = getattr(self._local, "request", None)
            keys = req.keys if req is not None and req.keys is not None and len(req.keys) == batch else None
            if keys is None:
                keys = [f"auto-{next(self._counter)}" for _ in range(batch)]
            self.stats.requests_seen += batch
            rows = [i for i, k in enumerate(keys) if self.sampler.sampled(k)]
            if not rows:
                return
            if self._queue.full():
                self.stats.dropped_queue_full += len(rows)
                return
            mask = self._arg("attention_mask", args, kwargs)
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                mask = torch.ones(batch, length, dtype=torch.long, device=ids.device)
            idx = torch.tensor(rows, device=ids.device)
            texts = None
            if req is not None and req.texts is not None and len(req.texts) == batch:
                texts = [req.texts[i] for i in rows]
            self._local.cap = _Capture(
                rows=idx,
                mask=mask.detach().index_select(0, idx).clone(),
                keys=[self.sampler.hashed_key(keys[i]) for i in rows],
                texts=texts,
                meta={**self.metadata, **(req.meta if req is not None else {})},
                ts=time.time(),
            )
        except Exception:
            self._local.cap = None
            self._count_error("hook_errors", "pre-forward hook failed")

    def _make_act_hook(self, site: str):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            cap = getattr(self._local, "cap", None)
            if cap is None:
                return
            try:
                h = output[0] if isinstance(output, (tuple, list)) else output
                if not isinstance(h, torch.Tensor):
                    h = output.last_hidden_state  # ModelOutput
                cap.acts[site] = h.detach().index_select(0, cap.rows).clone()
            except Exception:
                self._count_error("hook_errors", f"hook at {site} failed")

        return hook

    def _make_attn_observer(self, site: str):
        def observe(module, query, key, attention_mask, kwargs) -> None:
            cap = getattr(self._local, "cap", None)
            if cap is None:
                return
            try:
                cap.attn[site] = attention.capture(module, query, key, attention_mask, kwargs, cap.rows)
            except Exception:
                self._count_error("hook_errors", f"attention capture at {site} failed")

        return observe

    def _post_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        cap = getattr(self._local, "cap", None)
        self._local.cap = None
        if cap is None:
            return
        try:
            self._queue.put_nowait(cap)
            self.stats.requests_sampled += len(cap.keys)
        except queue.Full:
            self.stats.dropped_queue_full += len(cap.keys)
        except Exception:
            self._count_error("hook_errors", "post-forward hook failed")

    # ------------------------------------------------------------------ worker (off the forward path)
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            cap = self._queue.get()
            started = time.perf_counter()
            try:
                if cap is _STOP:
                    return
                try:
                    records = self.reduce(cap)
                except Exception:
                    self._count_error("worker_errors", "reducing a capture failed")
                    continue
                for rec in records:
                    try:
                        self.sink.write(rec)
                        self.stats.records_emitted += 1
                    except Exception:
                        self._count_error("sink_errors", "sink write failed")
            finally:
                self.stats.worker_busy_seconds += time.perf_counter() - started
                self._queue.task_done()

    def reduce(self, cap: _Capture) -> list[Record]:
        """Turn one capture into one record per sampled row."""
        with torch.no_grad():
            per_site: dict[str, dict[str, torch.Tensor]] = {}
            for site in self.site_names:
                if site in cap.acts:
                    per_site[site] = pool_activations(cap.acts[site], cap.mask)
                elif site in cap.attn:
                    per_site[site] = {"heads": attention_heads(cap.attn[site], cap.mask)}
            arrays = {s: {n: t.float().cpu().numpy() for n, t in d.items()} for s, d in per_site.items()}
            n_tokens = cap.mask.sum(1).tolist()
        # the tap's own counters travel with the records, so the monitor can export drops per replica
        meta = {**cap.meta, "tap_sampled": str(self.stats.requests_sampled),
                "tap_dropped": str(self.stats.dropped_queue_full),
                "sink_dropped": str(getattr(self.sink, "dropped", 0))}
        return [
            Record(
                model=self.model_name,
                fingerprint=self.fingerprint,
                key=key,
                n_tokens=int(n_tokens[i]),
                sites={s: {n: a[i] for n, a in d.items()} for s, d in arrays.items()},
                ts=cap.ts,
                meta=meta,
                text=cap.texts[i] if cap.texts is not None else None,
            )
            for i, key in enumerate(cap.keys)
        ]


def _is_decode_step(past_key_values: object, cache_position: object) -> bool:
    """True for a forward that extends a non-empty KV cache (a generate() decode step)."""
    if past_key_values is not None:
        get_len = getattr(past_key_values, "get_seq_length", None)
        if callable(get_len):
            return int(get_len()) > 0
        if isinstance(past_key_values, (tuple, list)) and past_key_values:
            first = past_key_values[0]
            return bool(first) and isinstance(first[0], torch.Tensor) and first[0].shape[-2] > 0
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0]) > 0
    return False


def _default_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(model).__name__
    name = str(name).rstrip("/").split("/")[-1] or type(model).__name__
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:100]
