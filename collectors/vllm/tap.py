"""The tap inside vLLM's model runner: one record per sampled request, from its prompt tokens.

vLLM runs one flat token stream per step, not a ``[batch, seq]`` tensor: the requests of the persistent
batch (``runner.input_batch``) each contribute ``query_start_loc[i+1] - query_start_loc[i]`` consecutive
tokens, starting at prompt position ``num_computed_tokens_cpu[i]``. A pre-hook on the runner's model reads
that layout from the runner's CPU-side arrays (no device sync) before every forward and decides, per
request:

* a **decode** chunk (its first position is past the prompt): nothing is captured
  (``decode_steps_skipped``, once per request and step);
* a **prompt** chunk of a sampled request: the sites copy its rows (``index_select`` of a slice +
  ``clone``; fused kernels later overwrite their inputs in place). **Chunked prefill** spreads one prompt
  over several steps: chunks accumulate per request until the prompt is complete, then one capture goes
  to the worker queue shared with the ``transformers`` tap (:class:`~collectors.tap.BaseTap`), which
  reduces it to exactly the same signature.
* **preemption**: a request recomputed from an earlier position has its capture cut back to that
  position; one whose record was already written is not recorded again.
* **prefix caching**: cached prompt tokens are never recomputed, so their activations never pass the
  sites. A sampled request whose first computed position is not 0 is skipped and counted
  (``prefix_cached_skipped``); run tapped servers with ``--no-enable-prefix-caching`` (the plugin warns).

Residual stream: vLLM's decoder layers return ``(mlp_out, residual)`` and add them inside the next
layer's fused norm; ``layers.N.resid`` is their sum, which equals the ``transformers`` hidden state.
Attention sites capture the post-RoPE queries and keys handed to vLLM's ``Attention`` layer; the worker
recomputes causal softmax over the whole prompt (:mod:`collectors.attention`).

**Capture modes**. ``hooks``: ``register_forward_hook`` on each site; needs ``enforce_eager=True``
(under ``torch.compile`` module hooks inside the compiled region do not fire; the tap detects that
and counts ``hook_errors``). ``op``: each site module's ``forward`` is wrapped to call the opaque custom
op ``latentwatch::capture`` on its output; ``torch.compile`` keeps the op (it is declared as mutating its
input, so it is never dead-code eliminated) and calls its Python body at run time. The op is added to
vLLM's ``splitting_ops`` so piecewise CUDA graphs replay around it rather than over it (not testable on
this project's CPU machines).

Every hook and op body is guarded like the ``transformers`` tap's: an exception is counted and logged,
never raised into serving; a full queue drops the capture and counts it.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from collectors import attention
from collectors.sinks import FileSink, Sink
from collectors.sites import Site, default_sites, resolve
from collectors.tap import BaseTap, _Capture
from collectors.vllm.private import make_private_folder
from collectors.vllm.settings import VllmTapSettings
from collectors.vllm.weights import FingerprintMappingError, native_fingerprint, served_fingerprint

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # vLLM appends "-" + 8 random hex characters to every request id
_TAPS: dict[int, VllmTap] = {}  # tap id -> tap, for the custom op's body
_ids = itertools.count(1)


@dataclass
class _Pending:
    """A sampled request whose prompt is being captured, chunk by chunk."""

    key: str
    prompt_len: int
    ts: float
    next_pos: int = 0
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    q: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    k: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    touched: float = 0.0

    def cut(self, pos: int) -> None:
        """Forget everything from prompt position ``pos`` on (a preempted request is being recomputed)."""
        for store in (self.acts, self.q, self.k):
            for site, chunks in store.items():
                kept, seen = [], 0
                for c in chunks:
                    if seen >= pos:
                        break
                    kept.append(c[: pos - seen])
                    seen += c.shape[0]
                store[site] = kept
        self.next_pos = pos


@dataclass
class _Slice:
    """Rows ``[start, start + take)`` of this step's token stream belong to ``pending``'s prompt."""

    pending: _Pending
    start: int
    take: int


def request_key(request_id: str) -> str:
    """The key sampling uses for a vLLM request id: the id the client gave (vLLM's random suffix removed)."""
    return _SUFFIX.sub("", request_id)


class VllmTap(BaseTap):
    """Tap a vLLM model runner (``GPUModelRunner`` or ``CPUModelRunner``) after its model has loaded.

    Args:
        runner: the model runner whose ``model`` is loaded.
        settings: :class:`~collectors.vllm.settings.VllmTapSettings`.
        sink: where records go; default: the one ``settings.sink`` names.
        salt: see :class:`~collectors.tap.Tap` (default ``$LATENTWATCH_TAP_SALT``).
    """

    def __init__(self, runner: object, settings: VllmTapSettings, *, sink: Sink | None = None,
                 salt: bytes | str | None = None) -> None:
        model: torch.nn.Module = runner.model
        vllm_config = runner.vllm_config
        self.hf_config = vllm_config.model_config.hf_config
        super().__init__(
            settings.sites or default_sites(model), sink=sink or make_sink(settings),
            sample_rate=settings.sample_rate, model_name=_served_name(vllm_config),
            metadata=settings.metadata, queue_size=settings.queue_size, keep_text=False, salt=salt,
        )
        self.runner = runner
        self.model = model
        self.settings = settings
        self.sites: list[Site] = [resolve(model, s) for s in self.site_names]
        self.capture_mode = _capture_mode(settings.capture, vllm_config)
        self.tap_id = next(_ids)
        self._step: list[_Slice] | None = None
        self._fired: set[str] = set()  # "<store>:<site>" of the captures that ran in this step
        self._wanted = {f"{store}:{s.name}" for s in self.sites
                        for store in (("q", "k") if s.kind == "attn" else ("acts",))}
        self._modules = [self._site_module(s) for s in self.sites]  # what each site hooks (or wraps)
        self._pending: dict[str, _Pending] = {}
        self._seen: collections.OrderedDict[str, bool] = collections.OrderedDict()  # request id -> sampled
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._handles: list = []
        self._wrapped: list[tuple[torch.nn.Module, object]] = []
        self._stats_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats_path: Path | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> VllmTap:
        """Compute the fingerprint, put the hooks (or ops) on the sites, start the worker."""
        if self._handles:
            return self
        self.fingerprint = self._fingerprint()
        timed = self._timed
        self._handles.append(self.model.register_forward_pre_hook(timed(self._pre_forward), with_kwargs=True))
        self._stop.clear()
        for i, (site, module) in enumerate(zip(self.sites, self._modules, strict=True)):
            if self.capture_mode == "hooks":
                if site.kind == "attn":
                    self._handles.append(module.register_forward_pre_hook(timed(self._attn_hook(site.name))))
                else:
                    self._handles.append(module.register_forward_hook(timed(self._act_hook(site))))
            else:
                self._wrap_with_op(module, i, site)
        self._handles.append(self.model.register_forward_hook(timed(self._post_forward)))
        _TAPS[self.tap_id] = self
        self._start_worker()
        if self.settings.stats_dir is not None:
            self.stats_path = Path(self.settings.stats_dir) / f"tap-{os.getpid()}-{self.tap_id}.json"
            self._stats_thread = threading.Thread(target=self._write_stats_loop, name="latentwatch-tap-stats",
                                                  daemon=True)
            self._stats_thread.start()
        return self

    def detach(self, timeout: float = 30.0) -> None:
        """Remove every hook and wrapper, finish queued work, stop the worker, flush the sink."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, original in self._wrapped:
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
        self._wrapped.clear()
        _TAPS.pop(self.tap_id, None)
        self._stop_worker(timeout)
        self._stop.set()
        if self._stats_thread is not None:
            self._stats_thread.join(timeout)
            self._write_stats()

    def _fingerprint(self) -> str:
        """The ``transformers`` fingerprint of the served weights (:mod:`collectors.vllm.weights`)."""
        model_config = self.runner.vllm_config.model_config
        try:
            return served_fingerprint(self.model, self.hf_config, model_config.model, model_config.dtype)
        except (FingerprintMappingError, OSError, ValueError) as exc:
            native = native_fingerprint(self.model, self.hf_config)
            log.warning("latentwatch vLLM tap: no transformers fingerprint (%s); records carry vLLM's own %s, "
                        "valid only for baselines and probes built from this deployment", exc, native)
            return native

    def _site_module(self, site: Site) -> torch.nn.Module:
        module = self.model.get_submodule(site.module_path)
        if site.kind == "attn":
            # the attention module of a vLLM layer computes q, k (RoPE applied) and hands them to `.attn`
            inner = getattr(module, "attn", None)
            if not isinstance(inner, torch.nn.Module):
                raise ValueError(f"site {site.name!r}: {site.module_path} has no vLLM Attention layer (.attn)")
            return inner
        return module

    # ------------------------------------------------------------------ per step (serving thread)
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._step = None
        self._fired = set()
        try:
            self.stats.forwards += 1
            batch = self.runner.input_batch
            n = batch.num_reqs
            if n == 0:
                return
            starts = self.runner.query_start_loc.np[: n + 1]
            computed = batch.num_computed_tokens_cpu[:n]
            prompts = batch.num_prompt_tokens[:n]
            req_ids = batch.req_ids[:n]
            now = time.time()
            step: list[_Slice] = []
            for i in range(n):
                s, e = int(starts[i]), int(starts[i + 1])
                if e <= s or req_ids[i] is None:
                    continue
                rid, pos0, prompt_len = req_ids[i], int(computed[i]), int(prompts[i])
                if pos0 >= prompt_len:
                    self.stats.decode_steps_skipped += 1
                    continue
                pending = self._pending_for(rid, i, pos0, prompt_len, now)
                if pending is not None:
                    pending.touched = now
                    step.append(_Slice(pending, s, min(e - s, prompt_len - pos0)))
            self._expire(now)
            self._step = step or None
        except Exception:
            self._step = None
            self._count_error("hook_errors", "vLLM step layout failed")

    def _pending_for(self, rid: str, index: int, pos0: int, prompt_len: int, now: float) -> _Pending | None:
        pending = self._pending.get(rid)
        if pending is not None:
            if pos0 < pending.next_pos:
                pending.cut(pos0)  # preempted and recomputed
            elif pos0 > pending.next_pos:  # a gap: a chunk was not captured
                del self._pending[rid]
                self.stats.hook_errors += 1
                return None
            return pending
        if rid in self._done or rid in self._seen:
            return None  # recorded already (recomputed after preemption) or not sampled
        key = self._key(rid, index, prompt_len)
        sampled = self.sampler.sampled(key)
        self._remember(self._seen, rid, sampled)
        self.stats.requests_seen += 1
        if not sampled:
            return None
        if pos0 > 0:
            self.stats.prefix_cached_skipped += 1
            return None
        if prompt_len > self.settings.max_prompt_tokens:
            self.stats.prompt_too_long_skipped += 1
            return None
        if len(self._pending) >= self.settings.max_pending:
            self.stats.dropped_queue_full += 1
            return None
        pending = _Pending(self.sampler.hashed_key(key), prompt_len, now, touched=now)
        self._pending[rid] = pending
        return pending

    def _key(self, rid: str, index: int, prompt_len: int) -> str:
        if self.settings.key == "prompt":
            tokens = self.runner.input_batch.token_ids_cpu[index, :prompt_len]
            return "prompt:" + tokens.tobytes().hex()
        return request_key(rid)

    @staticmethod
    def _remember(store: collections.OrderedDict, rid: str, value: object, limit: int = 65_536) -> None:
        store[rid] = value
        if len(store) > limit:
            store.popitem(last=False)

    def _expire(self, now: float, idle: float = 600.0) -> None:
        """Drop prompts nobody has computed for ``idle`` seconds (aborted while being prefilled)."""
        for rid in [r for r, p in self._pending.items() if now - p.touched > idle]:
            del self._pending[rid]
            self.stats.dropped_queue_full += 1

    def _take(self, site: str, rows: torch.Tensor, store: str) -> None:
        """Copy this step's prompt rows of ``rows`` (``[tokens, ...]``) into each sampled request's chunks."""
        for sl in self._step or ():
            chunks = getattr(sl.pending, store).setdefault(site, [])
            chunks.append(rows[sl.start: sl.start + sl.take].detach().clone())
        self._fired.add(f"{store}:{site}")

    def _act_hook(self, site: Site) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            if self._step is None:
                return
            try:
                self._capture_output(site, output)
            except Exception:
                self._count_error("hook_errors", f"hook at {site.name} failed")

        return hook

    def _capture_output(self, site: Site, output: object) -> None:
        if isinstance(output, (tuple, list)):
            h = output[0]
            # a decoder layer's (mlp_out, residual): layers.N.resid is their sum, the residual stream after it
            if site.name.endswith(".resid") and len(output) > 1 and isinstance(output[1], torch.Tensor):
                h = h + output[1]
        else:
            h = output
        self._take(site.name, h.reshape(h.shape[0], -1) if h.dim() > 2 else h, "acts")

    def _attn_hook(self, site: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self._step is None:
                return
            try:
                self._capture_qk(module, site, args[0], args[1])
            except Exception:
                self._count_error("hook_errors", f"attention capture at {site} failed")

        return hook

    def _capture_qk(self, module: torch.nn.Module, site: str, query: torch.Tensor, key: torch.Tensor) -> None:
        self._take(site, query.reshape(query.shape[0], module.num_heads, module.head_size), "q")
        self._take(site, key.reshape(key.shape[0], module.num_kv_heads, module.head_size), "k")

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        step, self._step = self._step, None
        if not step:
            return
        try:
            missing = self._wanted - self._fired
            if missing:
                # a site never ran its capture (forward hooks under torch.compile): these prompts are lost
                lost = {id(sl.pending) for sl in step}
                self._pending = {r: p for r, p in self._pending.items() if id(p) not in lost}
                self._count_error("hook_errors", f"sites {sorted(missing)} captured nothing in a prefill step "
                                  "(torch.compile with capture: hooks? use capture: op or enforce_eager)",
                                  traceback=False)
                return
            for sl in step:
                sl.pending.next_pos += sl.take
            for rid in [r for r, p in self._pending.items() if p.next_pos >= p.prompt_len]:
                self._finish(rid, self._pending.pop(rid))
        except Exception:
            self._count_error("hook_errors", "vLLM post-forward failed")

    def _finish(self, rid: str, pending: _Pending) -> None:
        self._remember(self._done, rid, None)
        if self._queue.full():
            self.stats.dropped_queue_full += 1
            return
        n = pending.prompt_len
        cap = _Capture(rows=torch.zeros(1, dtype=torch.long), mask=torch.ones(1, n, dtype=torch.long),
                       keys=[pending.key], texts=None, meta=dict(self.metadata), ts=pending.ts)
        for site, module in zip(self.sites, self._modules, strict=True):
            if site.kind == "attn":
                q = torch.cat(pending.q[site.name])[:n].transpose(0, 1)[None]  # [1, heads, T, d]
                k = torch.cat(pending.k[site.name])[:n].transpose(0, 1)[None]
                cap.attn[site.name] = attention.AttentionCapture(
                    query=q, key=k, mask=None, scaling=float(module.impl.scale),
                    softcap=getattr(module.impl, "logits_soft_cap", None) or None, is_causal=True)
            else:
                cap.acts[site.name] = torch.cat(pending.acts[site.name])[:n][None]  # [1, T, d]
        try:
            self._queue.put_nowait(cap)
            self.stats.requests_sampled += 1
        except Exception:
            self.stats.dropped_queue_full += 1

    # ------------------------------------------------------------------ compile-safe capture
    def _wrap_with_op(self, module: torch.nn.Module, index: int, site: Site) -> None:
        register_op()
        original = module.__dict__.get("forward")
        bound = module.forward
        tap_id, op = self.tap_id, torch.ops.latentwatch.capture
        if site.kind == "attn":
            def forward(query, key, *args, **kwargs):
                op(query, key, tap_id, index)
                return bound(query, key, *args, **kwargs)
        else:
            def forward(*args, **kwargs):
                out = bound(*args, **kwargs)
                if isinstance(out, (tuple, list)):
                    second = out[1] if len(out) > 1 and isinstance(out[1], torch.Tensor) else None
                    op(out[0], second, tap_id, index)
                else:
                    op(out, None, tap_id, index)
                return out
        module.forward = forward
        self._wrapped.append((module, original))

    def _on_op(self, index: int, first: torch.Tensor, second: torch.Tensor | None) -> None:
        if self._step is None:
            return
        started = time.perf_counter()
        site = self.sites[index]
        try:
            if site.kind == "attn":
                self._capture_qk(self._modules[index], site.name, first, second)
            else:
                self._capture_output(site, (first, second) if second is not None else first)
        except Exception:
            self._count_error("hook_errors", f"capture op at {site.name} failed")
        finally:
            self.stats.hook_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ counters for the API server
    def snapshot(self) -> dict:
        """The counters, as the API server's collector reads them (:mod:`collectors.vllm.stats`)."""
        return {"model_name": self.model_name, "pid": os.getpid(), "stats": asdict(self.stats),
                "sink_dropped": int(getattr(self.sink, "dropped", 0)), "capture": self.capture_mode,
                "fingerprint": self.fingerprint}

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        try:
            make_private_folder(self.stats_path.parent)
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
            os.replace(tmp, self.stats_path)
        except OSError:
            self._count_error("sink_errors", f"writing the tap's counters to {self.stats_path} failed")

    def _write_stats_loop(self, every: float = 1.0) -> None:
        while not self._stop.wait(every):
            self._write_stats()


def make_sink(settings: VllmTapSettings) -> Sink:
    """The sink ``settings.sink`` names."""
    if settings.sink == "kafka":
        from collectors.kafka_sink import KafkaConnection, KafkaSink

        kafka = settings.kafka
        assert kafka is not None  # load_settings checked
        connection = KafkaConnection(**kafka.model_dump(exclude={"buffer_bytes"}))
        return KafkaSink(connection, buffer_bytes=kafka.buffer_bytes, half=settings.half)
    return FileSink(settings.sink.removeprefix("file:"), half=settings.half)


def _served_name(vllm_config: object) -> str:
    name = vllm_config.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return str(name)[:100]


def _capture_mode(wanted: str, vllm_config: object) -> str:
    eager = bool(vllm_config.model_config.enforce_eager)
    if wanted == "auto":
        return "hooks" if eager else "op"
    if wanted == "hooks" and not eager:
        log.warning("latentwatch vLLM tap: capture 'hooks' without enforce_eager: forward hooks do not fire "
                    "inside torch.compile; prompts will be counted as hook errors (use capture: op)")
    return wanted


_op_lock = threading.Lock()


def register_op() -> None:
    """Register ``latentwatch::capture`` once per process (its body looks the tap up by id)."""
    with _op_lock:
        if hasattr(torch.ops, "latentwatch") and hasattr(torch.ops.latentwatch, "capture"):
            return

        # declared as mutating `first` so that torch.compile never drops it as dead code (it returns
        # nothing); it only reads it
        @torch.library.custom_op("latentwatch::capture", mutates_args=("first",))
        def capture(first: torch.Tensor, second: torch.Tensor | None, tap: int, site: int) -> None:
            target = _TAPS.get(tap)
            if target is not None:
                target._on_op(site, first, second)

        @capture.register_fake
        def _(first: torch.Tensor, second: torch.Tensor | None, tap: int, site: int) -> None:
            return None
