"""Artifacts for on-call people: alert rules (``rules``), Grafana dashboards (``dashboards``), the HTML report."""
