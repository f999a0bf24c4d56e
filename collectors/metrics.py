"""The tap's own counters, exported by the serving process (a ``prometheus_client`` collector).

Records also carry the tap's cumulative counters in their metadata, but a dropped record cannot say that
it was dropped, and a sidecar only hears from a tap while records flow. The serving process already
runs a Prometheus endpoint (or can start one); registering this collector there makes the counters real
counters of the process that owns them::

    from prometheus_client import REGISTRY, start_http_server
    from collectors.metrics import TapCollector

    REGISTRY.register(TapCollector(tap))      # or your server's registry
    start_http_server(9100)                   # if the server has no /metrics of its own

Label: ``model_name`` (one per tap), ``stage`` for drops (``queue``: its worker was behind,
``transport``: its sink was), ``kind`` for errors (``hook``, ``worker``, ``sink``). Values are read at
scrape time; a restart of the serving process resets them like any Prometheus counter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class TapCollector(Collector):
    """Collector of one (or several) taps' ``TapStats``."""

    def __init__(self, *taps: Any) -> None:
        self.taps = taps

    def collect(self) -> Iterator[CounterMetricFamily]:
        def family(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"latentwatch_tap_{name}", doc, labels=["model_name", *labels])

        seen = family("requests_seen", "Requests that went through the tapped model", [])
        sampled = family("requests_sampled", "Requests the tap sampled", [])
        emitted = family("records_emitted", "Records handed to the sink", [])
        dropped = family("process_dropped", "Sampled requests dropped in the serving process, by stage", ["stage"])
        errors = family("errors", "Hook, worker and sink failures (never raised into the model)", ["kind"])
        skipped = family("decode_steps_skipped", "Decode steps recognised and skipped", [])
        skipped_req = family("requests_skipped", "Sampled requests not recorded, by reason (vLLM: prompt start "
                             "served from the prefix cache, prompt longer than max_prompt_tokens)", ["reason"])
        hook = family("hook_seconds", "Time spent in the tap's hooks on the serving thread", [])
        for tap in self.taps:
            st, m = tap.stats, tap.model_name
            seen.add_metric([m], st.requests_seen)
            sampled.add_metric([m], st.requests_sampled)
            emitted.add_metric([m], st.records_emitted)
            dropped.add_metric([m, "queue"], st.dropped_queue_full)
            dropped.add_metric([m, "transport"], getattr(tap.sink, "dropped", 0))
            for kind in ("hook", "worker", "sink"):
                errors.add_metric([m, kind], getattr(st, f"{kind}_errors"))
            skipped.add_metric([m], st.decode_steps_skipped)
            skipped_req.add_metric([m, "prefix_cached"], getattr(st, "prefix_cached_skipped", 0))
            skipped_req.add_metric([m, "too_long"], getattr(st, "prompt_too_long_skipped", 0))
            hook.add_metric([m], st.hook_seconds)
        yield from (seen, sampled, emitted, dropped, errors, skipped, skipped_req, hook)
