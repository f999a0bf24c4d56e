"""Sidecar configuration: one YAML file, validated, overridable by environment variables.

Example (``deploy/sidecar.yaml``)::

    baseline: /artifacts/baseline.safetensors
    probes: /artifacts/probes            # optional: concept scores and rates
    source:
      kind: file                         # tail a file written by the tap's FileSink
      path: /signatures/live.lwsr
    host: 0.0.0.0
    port: 9464

or, to join a Kafka consumer group (docs/kafka.md)::

    source:
      kind: kafka
      kafka:
        bootstrap_servers: kafka-0:9092,kafka-1:9092
        topic: latentwatch.smollm2
        group_id: latentwatch-smollm2
        dead_letter_topic: latentwatch.smollm2.dead    # optional
        security_protocol: SASL_SSL                    # optional, with sasl_* / ssl_* fields

Every field can be overridden by ``LATENTWATCH_<FIELD>``, nested fields with ``__``
(``LATENTWATCH_SOURCE__PATH=/data/x.lwsr``, ``LATENTWATCH_PORT=9000``). Environment wins over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from collectors.config import EnvOverFile, read_fields
from monitor.sidecar.kafka_source import KafkaSourceConfig


class ConfigError(ValueError):
    """A configuration that cannot run, with a message naming the file and field."""


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["file", "kafka", "none"] = Field(
        "file", description="'file' tails a signature file; 'kafka' joins a consumer group (source.kafka); "
                            "'none' takes records only from POST /ingest")
    path: Path | None = None
    kafka: KafkaSourceConfig | None = None
    poll_seconds: float = Field(0.5, gt=0, le=60)
    from_start: bool = Field(True, description="read what the file already holds before tailing it")


class IngestConfig(BaseModel):
    """``POST /ingest``: off by default; a credentialed path on its own listener (docs/sidecar.md)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="accept records over HTTP (latentwatch replay); off by default")
    host: str = Field("127.0.0.1", description="the ingest listener's address; loopback unless you need it")
    port: int = Field(9465, ge=0, le=65535, description="its own port, never the scrape port")
    token_file: Path | None = Field(None, description="file holding the bearer token (e.g. a mounted Secret)")
    token_env: str | None = Field(None, description="name of an environment variable holding the bearer token")
    max_body_bytes: int = Field(8 << 20, ge=1024, le=64 << 20, description="largest accepted body (413 above)")
    max_records_per_body: int = Field(4096, ge=1, le=1_000_000, description="records in one body (413 above)")
    max_concurrent_bodies: int = Field(2, ge=1, le=64, description="bodies read and analyzed at once "
                                                                    "(503 above); bounds memory")
    ack_timeout_seconds: float = Field(10.0, gt=0, le=300, description="with a checkpoint, a body is answered "
                                       "once a checkpoint covers it; the longest wait for one")
    idempotency_keys: int = Field(1024, ge=0, le=100_000, description="Idempotency-Key values remembered "
                                  "(and checkpointed): a retried body is answered, not analyzed twice")

    def token(self) -> bytes:
        """The bearer token, from ``token_file`` or ``token_env``; raises ConfigError when absent or short."""
        import os

        if self.token_file is not None:
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"ingest.token_file: cannot read {self.token_file}: {exc.strerror}") from exc
            where = f"ingest.token_file {self.token_file}"
        elif self.token_env:
            value = os.environ.get(self.token_env, "").strip()
            where = f"ingest.token_env ${self.token_env}"
        else:
            raise ConfigError("ingest.enabled needs ingest.token_file or ingest.token_env (a bearer token)")
        if len(value) < 16:
            raise ConfigError(f"{where}: the ingest token must be at least 16 characters")
        return value.encode()


class HttpConfig(BaseModel):
    """Limits of the HTTP listeners (uvicorn): slow or many clients cannot starve ``/metrics``."""

    model_config = ConfigDict(extra="forbid")
    max_connections: int = Field(256, ge=4, le=100_000, description="open connections per listener; "
                                                                     "the oldest idle ones are closed above")
    header_timeout_seconds: float = Field(10.0, gt=0, le=300, description="a request's headers must arrive "
                                                                           "within this time")
    keep_alive_seconds: float = Field(5.0, gt=0, le=300, description="idle keep-alive connections are closed after")
    body_timeout_seconds: float = Field(30.0, gt=0, le=600, description="an ingest body must arrive within this")
    shutdown_seconds: float = Field(10.0, gt=0, le=120, description="in-flight requests get this long at SIGTERM")


class CheckpointConfig(BaseModel):
    """Drift state that survives restarts (monitor/sidecar/checkpoint.py); off without a path."""

    model_config = ConfigDict(extra="forbid")
    path: Path | None = Field(None, description="checkpoint file on a writable volume, e.g. /state/latentwatch.ckpt")
    interval_seconds: float = Field(10.0, gt=0, le=3600, description="how often it is written (and at SIGTERM)")


class AuditConfig(BaseModel):
    """The audit trail (monitor/audit/, docs/audit.md): off unless enabled; needs an operator's key."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="write a tamper-evident trail of every record and alarm")
    dir: Path | None = Field(None, description="folder for the segments, on a persistent volume")
    key_file: Path | None = Field(None, description="file holding the HMAC key for checkpoints (a Secret)")
    key_env: str | None = Field(None, description="name of an environment variable holding the key")
    segment_bytes: int = Field(64 << 20, ge=4096, le=1 << 34, description="a new segment above this size")
    segment_seconds: float = Field(86400.0, gt=0, description="a new segment after this long")
    retention_days: float = Field(183.0, gt=0, description="whole segments older than this are removed "
                                  "(recorded in the trail); default about 6 months")
    checkpoint_seconds: float = Field(1.0, gt=0, le=3600, description="authenticated checkpoint and fsync "
                                      "interval: a machine crash loses at most this much of the trail")
    include_text: bool = Field(False, description="keep the request text when the tap sent it (off: no raw "
                                                  "text in the trail)")

    def key(self) -> bytes:
        """The HMAC key, from ``key_file`` or ``key_env``; raises ConfigError when absent or short."""
        import os

        if self.key_file is not None:
            try:
                value = self.key_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"audit.key_file: cannot read {self.key_file}: {exc.strerror}") from exc
            where = f"audit.key_file {self.key_file}"
        elif self.key_env:
            value = os.environ.get(self.key_env, "").strip().encode()
            where = f"audit.key_env ${self.key_env}"
        else:
            raise ConfigError("audit.enabled needs audit.key_file or audit.key_env (an HMAC key)")
        if len(value) < 16:
            raise ConfigError(f"{where}: the audit key must be at least 16 bytes")
        if self.dir is None:
            raise ConfigError("audit.enabled needs audit.dir (a folder on a persistent volume)")
        return value


class Settings(EnvOverFile):
    model_config = SettingsConfigDict(env_prefix="LATENTWATCH_", env_nested_delimiter="__", extra="forbid")

    baseline: Path
    probes: Path | None = None
    source: SourceConfig = Field(default_factory=SourceConfig)
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    batch_size: int = Field(512, ge=1, le=100_000)
    max_replicas: int = Field(64, ge=1, le=10_000, description="cap on distinct `replica` label values")
    replica_ttl_seconds: float = Field(3600, gt=0, description="a replica not heard from for this long is "
                                                                "dropped from the tap metrics")
    attribution_top: int = Field(5, ge=1, le=20)
    threads: int = Field(1, ge=1, le=64, description="BLAS threads for the analysis; scale out with replicas "
                                                      "(more threads mostly spin on small matrices)")
    log_format: Literal["json", "text"] = "json"
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)


def load_settings(path: str | Path | None) -> Settings:
    data = read_fields(path, ConfigError) if path is not None else {}
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'environment'}: invalid configuration:\n{exc}") from exc
    if settings.source.kind == "file" and settings.source.path is None:
        raise ConfigError(f"{path or 'environment'}: source.kind 'file' needs source.path")
    if settings.source.kind == "kafka" and settings.source.kafka is None:
        raise ConfigError(f"{path or 'environment'}: source.kind 'kafka' needs source.kafka "
                          "(at least bootstrap_servers and topic)")
    if settings.ingest.enabled:
        try:
            settings.ingest.token()
        except ConfigError as exc:
            raise ConfigError(f"{path or 'environment'}: {exc}") from exc
        if settings.ingest.port == settings.port and settings.port != 0:
            raise ConfigError(f"{path or 'environment'}: ingest.port must differ from port (the scrape port)")
    if settings.audit.enabled:
        try:
            settings.audit.key()
        except ConfigError as exc:
            raise ConfigError(f"{path or 'environment'}: {exc}") from exc
    return settings
