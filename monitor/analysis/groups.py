"""Groups of reference traffic: which records belong together (a document, a session, a tenant, an hour).

Live traffic is not a bag of interchangeable records. It arrives in documents, conversations, tenants
and days, and records of one group are more alike than records of two groups. A threshold calibrated
on records resampled from the baseline's own pool never sees that between-group variation, and the
false-alarm budget fails on the next day's traffic. The baseline therefore needs to know the groups.

``group_by`` (the analyzer setting, ``latentwatch baseline build --group-by``) is one of:

* ``meta:<key>`` -- the value of a record metadata key (``meta:tenant``, ``meta:doc``, ``meta:session``);
* ``ts:<seconds>`` -- time buckets of the record timestamp (``ts:3600``: one group per hour);
* ``record`` -- every record its own group: exchangeable traffic, the fallback, with a warning.

>>> import numpy as np
>>> from collectors.record import Record
>>> recs = [Record(model="m", fingerprint="f", key=f"{i:032x}", n_tokens=1, sites={}, ts=36_000.0 + 900 * i,
...                meta={"tenant": "ab"[i % 2]}) for i in range(8)]
>>> assign(recs, "meta:tenant").tolist()
[0, 1, 0, 1, 0, 1, 0, 1]
>>> assign(recs, "ts:3600").tolist()
[0, 0, 0, 0, 1, 1, 1, 1]
>>> folds(assign(recs, "ts:3600"), k=2, seed=0).tolist() in ([0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0])
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from collectors.record import Record

PATTERN = r"^(record|meta:[A-Za-z0-9_.\-]{1,64}|ts:[0-9]+(\.[0-9]+)?)$"
#: Below this many groups the budget covers only the variation seen in them (a warning, not an error).
FEW_GROUPS = 20


class GroupError(ValueError):
    """Records that cannot be grouped as asked (a missing metadata key, too few groups)."""


def assign(records: Sequence[Record], group_by: str) -> np.ndarray:
    """Group index ``[n]`` per record, numbered in order of first appearance."""
    if not re.match(PATTERN, group_by):
        raise GroupError(f"group_by {group_by!r}: use 'record', 'meta:<key>' or 'ts:<seconds>'")
    if group_by == "record":
        return np.arange(len(records))
    kind, _, arg = group_by.partition(":")
    if kind == "meta":
        labels = [r.meta.get(arg) for r in records]
        missing = sum(v is None for v in labels)
        if missing:
            raise GroupError(f"group_by {group_by}: {missing} of {len(records)} records have no metadata key "
                             f"{arg!r} (give the tap metadata={{{arg!r}: ...}} per request, or choose another "
                             "group_by)")
    else:
        seconds = float(arg)
        if seconds <= 0:
            raise GroupError(f"group_by {group_by}: the time bucket must be positive")
        if any(r.ts <= 0 for r in records):
            raise GroupError(f"group_by {group_by}: some records carry no timestamp")
        labels = [math.floor(r.ts / seconds) for r in records]
    index: dict[object, int] = {}
    return np.array([index.setdefault(v, len(index)) for v in labels], dtype=np.int64)


def folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold ``[n]`` (0..k-1) per record: whole groups per fold, folds of about equal record counts.

    Groups are shuffled, then each goes to the fold with the fewest records so far (largest first),
    so no fold is starved when group sizes differ.
    """
    ids, sizes = np.unique(groups, return_counts=True)
    if len(ids) < k:
        raise GroupError(f"{len(ids)} groups cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(k)
    fold_of = np.empty(len(ids), dtype=np.int64)
    for i in order:
        f = int(np.argmin(load))
        fold_of[i] = f
        load[f] += sizes[i]
    lookup = dict(zip(ids.tolist(), fold_of.tolist(), strict=True))
    return np.array([lookup[g] for g in groups.tolist()], dtype=np.int64)


def halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks splitting the records by whole groups (about half of the records each)."""
    f = folds(groups, 2, seed)
    return f == 0, f == 1


def runs(groups: np.ndarray) -> list[np.ndarray]:
    """Per group, the indices of its records in their recorded order."""
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    return np.split(order, bounds)
