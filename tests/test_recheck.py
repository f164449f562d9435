"""A new version's evaluation costs the same at concept 50 as at concept 3."""

from __future__ import annotations

import math

from cns.report import recheck_sample


def test_a_version_rechecks_its_own_concept_and_a_fixed_number_of_earlier_ones():
    names = [f"c{i}" for i in range(50)]
    for version in range(1, 60):
        picked = recheck_sample(names, version, 2)
        assert len(picked) == 3 and picked[-1] == "c49"
        assert picked[:-1] == [n for n in names if n in picked[:-1]], "learning order kept"


def test_every_earlier_concept_is_rechecked_within_a_bounded_number_of_versions():
    for count, earlier in ((50, 2), (7, 3), (10, 1)):
        names = [f"c{i}" for i in range(count)]
        window = math.ceil((count - 1) / earlier)
        for start in range(1, 30):
            seen = set()
            for version in range(start, start + window):
                seen.update(recheck_sample(names, version, earlier))
            assert seen == set(names), (count, earlier, start)


def test_few_concepts_or_a_negative_setting_recheck_everything():
    assert recheck_sample(["a", "b", "c"], 3, 2) == ["a", "b", "c"]
    assert recheck_sample([f"c{i}" for i in range(9)], 9, -1) == [f"c{i}" for i in range(9)]
    assert recheck_sample([], 0, 2) == []
