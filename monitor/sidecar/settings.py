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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from monitor.sidecar.kafka_source import KafkaSourceConfig


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["file", "kafka", "none"] = Field(
        "file", description="'file' tails a signature file; 'kafka' joins a consumer group (source.kafka); "
                            "'none' takes records only from POST /ingest")
    path: Path | None = None
    kafka: KafkaSourceConfig | None = None
    poll_seconds: float = Field(0.5, gt=0, le=60)
    from_start: bool = Field(True, description="read what the file already holds before tailing it")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTWATCH_", env_nested_delimiter="__", extra="forbid")

    baseline: Path
    probes: Path | None = None
    source: SourceConfig = Field(default_factory=SourceConfig)
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    batch_size: int = Field(512, ge=1, le=100_000)
    max_replicas: int = Field(64, ge=1, le=10_000, description="cap on distinct `replica` label values")
    attribution_top: int = Field(5, ge=1, le=20)
    threads: int = Field(1, ge=1, le=64, description="BLAS threads for the analysis; scale out with replicas "
                                                      "(more threads mostly spin on small matrices)")
    log_format: Literal["json", "text"] = "json"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        return (env_settings, init_settings)  # environment overrides the YAML file


class ConfigError(ValueError):
    """A configuration that cannot run, with a message naming the file and field."""


def load_settings(path: str | Path | None) -> Settings:
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: configuration must be a mapping of fields")
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'environment'}: invalid configuration:\n{exc}") from exc
    if settings.source.kind == "file" and settings.source.path is None:
        raise ConfigError(f"{path or 'environment'}: source.kind 'file' needs source.path")
    if settings.source.kind == "kafka" and settings.source.kafka is None:
        raise ConfigError(f"{path or 'environment'}: source.kind 'kafka' needs source.kafka "
                          "(at least bootstrap_servers and topic)")
    return settings
