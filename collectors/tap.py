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
prefill forward (the one that starts with an empty KV cache). Decode steps, which extend a cache, are
recognised from what the forward receives -- the length of the KV cache object it is handed (whatever the
argument is called), else a 2-D attention mask longer than the input -- and skipped
(``decode_steps_skipped``), so a request yields one record however many tokens it generates. When
generate() copies each prompt for ``num_return_sequences`` or beams, a request given a key through
:meth:`Tap.request` is recorded once.
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
    prefix_cached_skipped: int = 0  # vLLM: sampled prompts whose start came from the prefix cache
    prompt_too_long_skipped: int = 0  # vLLM: sampled prompts longer than max_prompt_tokens
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


class BaseTap:
    """What every tap shares: sampling, the bounded work queue, the worker that reduces captures to records,
    the counters and the sink. A tap subclass only decides, on the serving thread, what a capture holds
    (:class:`Tap` for ``transformers`` modules, :class:`collectors.vllm.tap.VllmTap` for vLLM's model runner).
    """

    def __init__(
        self,
        site_names: Sequence[str],
        *,
        sink: Sink,
        sample_rate: float,
        model_name: str,
        metadata: Mapping[str, str] | None,
        queue_size: int,
        keep_text: bool,
        salt: bytes | str | None,
    ) -> None:
        self.site_names = list(site_names)
        self.sink = sink
        self.sampler = Sampler(sample_rate, deployment_salt(salt))
        self.model_name = model_name
        self.keep_text = keep_text
        self.stats = TapStats()
        self.metadata = self._clean_meta({"replica": socket.gethostname()[:64], **(metadata or {})})
        self.fingerprint: str = ""
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        self._last_error_log = 0.0

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run, name="latentwatch-tap", daemon=True)
        self._worker.start()

    def _stop_worker(self, timeout: float) -> None:
        if self._worker is not None:
            self.flush(timeout)
            self._queue.put(_STOP)
            self._worker.join(timeout)
            self._worker = None

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

    def _count_error(self, counter: str, what: str, *, traceback: bool = True) -> None:
        """Count a failure; log it (with the exception's traceback unless ``traceback=False``: a failure
        noticed, not raised) at most once per 10 s."""
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        now = time.monotonic()
        if now - self._last_error_log > 10.0:
            self._last_error_log = now
            emit = log.exception if traceback else log.warning
            emit("latentwatch tap: %s (counted in %s=%d)", what, counter, getattr(self.stats, counter))

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


class Tap(BaseTap):
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
        super().__init__(
            list(sites) if sites else default_sites(model), sink=sink, sample_rate=sample_rate,
            model_name=model_name or _default_name(model), metadata=metadata, queue_size=queue_size,
            keep_text=keep_text, salt=salt,
        )
        self.model = model
        self.sites: list[Site] = [resolve(model, s) for s in self.site_names]
        self._local = threading.local()
        self._handles: list = []
        self._attn_modules: list[torch.nn.Module] = []
        self._saved_attn_impl: str | None = None
        self._counter = itertools.count()
        self._arg_names = list(inspect.signature(model.forward).parameters)

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
        self._start_worker()
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
        self._stop_worker(timeout)

    def __enter__(self) -> Tap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

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

    # ------------------------------------------------------------------ hooks (forward path)
    def _arg(self, name: str, args: tuple, kwargs: dict) -> object:
        if name in kwargs:
            return kwargs[name]
        try:
            i = self._arg_names.index(name)
        except ValueError:
            return None
        return args[i] if i < len(args) else None

    def _tokens_before(self, args: tuple, kwargs: dict, length: int, mask: object) -> int:
        """How many tokens of this sequence were processed before this forward (0 for a prefill).

        Decided from what the forward receives, not from argument names: the length of the KV cache it
        is handed; without one, a 2-D attention mask longer than the input (generate() passes the mask of
        cache + input); without either, the first cache position of models that take ``cache_position``.
        """
        cached = _cache_length(itertools.chain(kwargs.values(), args))
        if cached is not None:
            return cached
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return max(0, int(mask.shape[1]) - length)
        position = self._arg("cache_position", args, kwargs)
        if isinstance(position, torch.Tensor) and position.numel():
            return int(position.reshape(-1)[0])
        return 0

    def _request_keys(self, req: _Request | None, ids: torch.Tensor) -> tuple[list[str], int]:
        """The keys of the requests in a batch and how many consecutive rows each request fills.

        One row per request, unless the batch holds ``n`` identical consecutive copies of each of the
        request's rows: generate() expands every prompt that way for ``num_return_sequences`` or beam
        search, and the request is then recorded once, from its first copy.
        """
        batch = ids.shape[0]
        given = req.keys if req is not None else None
        if given:
            n = len(given)
            if batch == n:
                return list(given), 1
            if batch % n == 0:
                grouped = ids.reshape(n, batch // n, -1)
                if bool((grouped == grouped[:, :1]).all()):
                    return list(given), batch // n
        return [f"auto-{next(self._counter)}" for _ in range(batch)], 1

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
            batch, length = ids.shape[0], ids.shape[1]
            mask = self._arg("attention_mask", args, kwargs)
            if self._tokens_before(args, kwargs, length, mask) > 0:
                self.stats.decode_steps_skipped += 1
                return
            req = getattr(self._local, "request", None)
            keys, copies = self._request_keys(req, ids)
            self.stats.requests_seen += len(keys)
            picked = [i for i, k in enumerate(keys) if self.sampler.sampled(k)]
            if not picked:
                return
            if self._queue.full():
                self.stats.dropped_queue_full += len(picked)
                return
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                mask = torch.ones(batch, length, dtype=torch.long, device=ids.device)
            idx = torch.tensor([i * copies for i in picked], device=ids.device)
            texts = None
            if req is not None and req.texts is not None and len(req.texts) == len(keys):
                texts = [req.texts[i] for i in picked]
            self._local.cap = _Capture(
                rows=idx,
                mask=mask.detach().index_select(0, idx).clone(),
                keys=[self.sampler.hashed_key(keys[i]) for i in picked],
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
def _cache_length(values: Iterator[object]) -> int | None:
    """Tokens held by the first KV cache among ``values``; ``None`` when there is none.

    A cache is recognised by what it does, not by the argument it came in: anything (not a tensor) with a
    callable ``get_seq_length`` (transformers' ``Cache`` classes, passed as ``cache=`` since 5.2x,
    ``past_key_values=`` before), or a legacy tuple of per-layer ``(key, value)`` tensors.
    """
    for value in values:
        if value is None or isinstance(value, torch.Tensor):
            continue
        get_len = getattr(value, "get_seq_length", None)
        if callable(get_len):
            return int(get_len())
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0]:
            first = value[0][0]
            if isinstance(first, torch.Tensor) and first.dim() == 4:
                return int(first.shape[-2])
    return None


def _default_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(model).__name__
    name = str(name).rstrip("/").split("/")[-1] or type(model).__name__
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:100]
