"""The vLLM tap's configuration: a YAML file and/or ``LATENTWATCH_VLLM_*`` environment variables.

The plugin does nothing unless ``$LATENTWATCH_VLLM_CONFIG`` (a file) or ``$LATENTWATCH_VLLM_SINK`` is set,
so installing ``latentwatch[vllm]`` never starts tapping a server by surprise. Example file::

    sink: file:/signatures/live.lwsr          # or kafka:  (with the kafka: section below)
    sites: [layers.9.resid, layers.19.resid, layers.29.resid, layers.19.attn]
    sample_rate: 0.1
    key: request_id                           # or prompt: a hash of the prompt's token ids
    capture: auto                             # hooks (needs enforce_eager) | op (compile-safe) | auto
    metadata: {tenant: shared}
    kafka:
      bootstrap_servers: kafka-0:9092
      topic: latentwatch.smollm2

Every field can be overridden by ``LATENTWATCH_VLLM_<FIELD>`` (``LATENTWATCH_VLLM_SAMPLE_RATE=0.05``,
``LATENTWATCH_VLLM_SITES=layers.9.resid,layers.19.resid``, nested with ``__``:
``LATENTWATCH_VLLM_KAFKA__TOPIC=...``); environment wins over the file. The salt for hashing request keys
is ``$LATENTWATCH_TAP_SALT``, as for the ``transformers`` tap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from collectors.config import EnvOverFile, read_fields
from collectors.kafka_sink import KafkaConnection

CONFIG_ENV = "LATENTWATCH_VLLM_CONFIG"
SINK_ENV = "LATENTWATCH_VLLM_SINK"


class VllmTapConfigError(ValueError):
    """A tap configuration that cannot run, naming the file or variable and the field."""


class KafkaSinkConfig(KafkaConnection):
    """Where records go with ``sink: kafka`` (the fields of :class:`~collectors.kafka_sink.KafkaConnection`)."""

    model_config = ConfigDict(extra="forbid")
    buffer_bytes: int = Field(32 * 2**20, ge=2**16, le=2**32)


class VllmTapSettings(EnvOverFile):
    """What the plugin taps, how often, and where the records go."""

    model_config = SettingsConfigDict(env_prefix="LATENTWATCH_VLLM_", env_nested_delimiter="__", extra="forbid")

    sink: str = Field(..., description="'file:<path>' (the tap's FileSink) or 'kafka' (the kafka: section)")
    sites: Annotated[list[str] | None, NoDecode] = Field(
        None, description="site names (collectors.sites); default: the residual stream at 1/3, 2/3 and the end")
    sample_rate: float = Field(0.1, ge=0.0, le=1.0)
    key: Literal["request_id", "prompt"] = Field(
        "request_id", description="what sampling is keyed on: vLLM's request id (the X-Request-Id a client "
                                  "sent, without vLLM's random suffix) or a hash of the prompt's token ids")
    capture: Literal["auto", "hooks", "op"] = Field(
        "auto", description="hooks: forward hooks (need enforce_eager); op: an opaque custom op at each site "
                            "that torch.compile keeps; auto: hooks when eager, else op")
    metadata: dict[str, str] = Field(default_factory=dict)
    queue_size: int = Field(32, ge=1, le=4096, description="completed captures waiting for the worker")
    max_pending: int = Field(64, ge=1, le=4096,
                             description="sampled prompts being captured at once (chunked prefill); beyond "
                                         "it new ones are dropped and counted")
    max_prompt_tokens: int = Field(4096, ge=1, le=1_000_000,
                                   description="longer prompts are skipped and counted (memory bound)")
    half: bool = Field(False, description="file sink: store arrays as float16")
    kafka: KafkaSinkConfig | None = None
    stats_dir: Path | None = Field(
        None, description="where the engine process leaves its counters for the API server's /metrics "
                          "(default: set by the plugin per server)")

    @field_validator("sites", mode="before")
    @classmethod
    def _split_sites(cls, value: object) -> object:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("sink")
    @classmethod
    def _check_sink(cls, value: str) -> str:
        if value != "kafka" and not (value.startswith("file:") and len(value) > 5):
            raise ValueError("sink must be 'file:<path>' or 'kafka'")
        return value


def configured() -> bool:
    """True when the operator asked for the tap (a config file or a sink in the environment)."""
    return bool(os.environ.get(CONFIG_ENV) or os.environ.get(SINK_ENV))


def load_settings(path: str | Path | None = None) -> VllmTapSettings:
    """The tap's settings from ``path`` (default ``$LATENTWATCH_VLLM_CONFIG``) and the environment."""
    path = path if path is not None else os.environ.get(CONFIG_ENV) or None
    where = str(path) if path is not None else "environment (LATENTWATCH_VLLM_*)"
    data = read_fields(path, VllmTapConfigError, "the tap configuration") if path is not None else {}
    try:
        settings = VllmTapSettings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise VllmTapConfigError(f"{where}: {field}: {first['msg']}") from None
    if settings.sink == "kafka" and settings.kafka is None:
        raise VllmTapConfigError(f"{where}: sink 'kafka' needs a kafka: section (bootstrap_servers, topic)")
    return settings
