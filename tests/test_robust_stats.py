"""One record cannot blind a detector: implausible values are refused, sums keep their precision."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from monitor.analysis import plausibility
from monitor.analysis.analyzer import Analyzer
from tests.test_analyzer import CONFIG, baseline, make_records, probes  # noqa: F401 - baseline is a fixture


def huge(records, at: int, value: float = 1e12):
    out = copy.deepcopy(records)
    out[at].sites["layers.2.resid"]["mean"][3] = value
    return out


def test_baseline_learns_plausibility_bounds(baseline):  # noqa: F811
    bounds = baseline.info[plausibility.INFO_KEY]
    assert set(bounds) == {"act:layers.2.resid", "norm:layers.2.resid", "attn:layers.2.attn"}
    assert all(0 < b < 100 for b in bounds.values())


def test_a_huge_finite_value_is_refused_and_counted(baseline):  # noqa: F811
    recs = make_records(400, np.random.default_rng(11))
    a, b = Analyzer(baseline, probes(), log_alarms=False), Analyzer(baseline, probes(), log_alarms=False)
    a.update(huge(recs, 150))  # the huge record alone is refused: the rest is analyzed as without it
    b.update(recs[:150] + recs[151:])
    assert a.stats.invalid_total["implausible"] == 1
    assert [s.value for s in a.states] == [s.value for s in b.states]
    # an activation 5x the baseline's largest is plausible (strong real drift must still be seen)
    c = Analyzer(baseline, probes(), log_alarms=False)
    c.update(make_records(50, np.random.default_rng(12), act_shift=3.0))
    assert c.stats.invalid_total["implausible"] == 0


@pytest.mark.parametrize("value", [1e12, -3e15])
def test_sums_keep_precision_after_a_huge_row_leaves_the_window(baseline, value):  # noqa: F811
    """Without plausibility bounds (an older baseline), a huge row still only affects the windows it is in."""
    unbounded = copy.copy(baseline)
    unbounded.info = {k: v for k, v in baseline.info.items() if k != plausibility.INFO_KEY}
    recs = make_records(600, np.random.default_rng(13))
    a = Analyzer(unbounded, probes(), log_alarms=False)
    b = Analyzer(unbounded, probes(), log_alarms=False)
    a.update(huge(recs, 200, value))
    b.update(recs)
    assert a.stats.invalid_total["implausible"] == 0
    for sa, sb in zip(a.states, b.states, strict=True):  # 400 records (4 windows) later: identical windows
        assert sa.value == pytest.approx(sb.value, rel=1e-9, abs=1e-12), sa.slot.name
