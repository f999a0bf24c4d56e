"""vLLM entry point (group ``vllm.general_plugins``): tap the model runner once its model has loaded.

vLLM calls :func:`register` in every process it starts, before any model loads. When the tap is configured
(``$LATENTWATCH_VLLM_CONFIG`` or ``$LATENTWATCH_VLLM_SINK``, see :mod:`collectors.vllm.settings`), it wraps
the model runners' ``load_model`` so that, in the engine process, a :class:`~collectors.vllm.tap.VllmTap`
attaches to the loaded model. Nothing of vLLM is copied or replaced: the wrapper calls the original and then
attaches. A tap that cannot attach (a bad site name, a broken sink) logs one line and serving continues
untapped.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import logging
import os
import tempfile

log = logging.getLogger("latentwatch.vllm")

_RUNNERS = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
            ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"))


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Safe to call many times, in any process."""
    from collectors.vllm.settings import VllmTapConfigError, configured, load_settings
    from collectors.vllm.stats import STATS_DIR_ENV

    if not configured():
        return
    try:
        load_settings()  # fail early, in the process the operator watches, with one line
    except VllmTapConfigError as exc:
        log.error("latentwatch: %s; vLLM serves without the tap", exc)
        return
    # the first process to load the plugin (the API server) names the folder its engine processes
    # leave their counters in; children inherit it
    os.environ.setdefault(STATS_DIR_ENV, os.path.join(tempfile.gettempdir(), f"latentwatch-vllm-{os.getpid()}"))
    for module_name, class_name in _RUNNERS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception:  # a runner this platform does not have
            continue
        original = cls.__dict__.get("load_model")
        if original is not None and not getattr(original, "_latentwatch", False):
            cls.load_model = _wrap_load_model(original)


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, "latentwatch_tap", None) is None:
            attach(self)
        return result

    load_model._latentwatch = True
    return load_model


def attach(runner: object) -> object | None:
    """Attach a tap to ``runner`` (its model loaded); ``None`` (and one logged line) when it cannot."""
    from collectors.vllm.settings import VllmTapConfigError, load_settings
    from collectors.vllm.tap import VllmTap

    try:
        settings = load_settings()
        tap = VllmTap(runner, settings).attach()
    except VllmTapConfigError as exc:
        log.error("latentwatch: %s; vLLM serves without the tap", exc)
        return None
    except Exception as exc:
        log.error("latentwatch: the tap could not attach (%s: %s); vLLM serves without it",
                  type(exc).__name__, exc)
        return None
    runner.latentwatch_tap = tap
    cache = getattr(runner, "cache_config", None)
    if getattr(cache, "enable_prefix_caching", False):
        log.warning("latentwatch: prefix caching is on: sampled prompts whose start is served from the cache "
                    "are not recorded (latentwatch_tap_requests_skipped_total{reason=\"prefix_cached\"}); "
                    "start vLLM with --no-enable-prefix-caching to record every sampled prompt")
    if tap.capture_mode == "op":
        ops = runner.vllm_config.compilation_config.splitting_ops
        # piecewise CUDA graphs (a non-empty list: vLLM splits at attention) replay around the op, not over
        # it; with no splitting (CPU, full graphs off) the op is an ordinary opaque call in the graph
        if isinstance(ops, list) and ops and "latentwatch::capture" not in ops:
            ops.append("latentwatch::capture")
    log.info("latentwatch: tapping %s at %s (sample rate %s, capture %s, fingerprint %s)", tap.model_name,
             ", ".join(tap.site_names), settings.sample_rate, tap.capture_mode, tap.fingerprint)
    atexit.register(tap.detach, 5.0)
    return tap
