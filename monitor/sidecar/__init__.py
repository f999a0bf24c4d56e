"""For the operator: the ``latentwatch serve`` process beside the inference server.

``settings`` (the YAML configuration) → a source (the tap's file, ``kafka_source``, or ``POST /ingest``)
→ ``service`` (the run loop, HTTP endpoints) → ``exporter`` (Prometheus metrics at scrape time).
``replay`` feeds a recorded stream to a running sidecar.
"""
