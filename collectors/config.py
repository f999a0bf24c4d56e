"""What every latentwatch configuration shares: one YAML file of fields, environment variables override it.

Used by the sidecar (:mod:`monitor.sidecar.settings`) and the vLLM tap (:mod:`collectors.vllm.settings`).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource


class EnvOverFile(BaseSettings):
    """Settings built from the file's fields (passed to the constructor); the environment wins over them."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        return (env_settings, init_settings)


def read_fields(path: str | Path, error: type[Exception], what: str = "configuration") -> dict:
    """The mapping of fields in the YAML file ``path`` (empty file: none); ``error`` naming the file if not."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a mapping of fields")
    return data
