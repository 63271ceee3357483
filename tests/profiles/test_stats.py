"""The statistics behind every accuracy claim, against published values and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.errors import MoeszError
from profiles.evaluation.accuracy import proportion, wilson_interval, z_value
from profiles.evaluation.paired import (compare_paired, holm_adjust, holm_verdicts,
                                        mcnemar_exact_p, newcombe_paired_interval)


def test_wilson_interval_of_8_of_10():
    # Wilson (1927) score interval; 8/10 at 95 % is the textbook 0.4902 to 0.9433
    iv = wilson_interval(8, 10)
    assert iv.value == 0.8
    assert (round(iv.low, 4), round(iv.high, 4)) == (0.4902, 0.9433)
    assert "wilson" in iv.method


def test_wilson_interval_at_the_edges_is_not_degenerate():
    zero, full = wilson_interval(0, 20), wilson_interval(20, 20)
    assert zero.low == 0.0 and round(zero.high, 4) == 0.1611  # z^2 / (n + z^2)
    assert full.high == 1.0 and round(full.low, 4) == 0.8389
    assert z_value() == pytest.approx(1.959964, abs=1e-6)


def test_proportion_counts_true_values():
    assert proportion([True, False, True, True]).value == 0.75


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_rejects_impossible_counts(k, n):
    with pytest.raises(MoeszError, match="successes"):
        wilson_interval(k, n)


def test_newcombe_paired_interval_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8:
    # Cavo et al. (2012) paired table [[59, 6], [16, 80]] -> -0.0621 (95 % CI -0.1186 to -0.0046)
    iv = newcombe_paired_interval(59, 6, 16, 80)
    assert round(iv.value, 4) == -0.0621
    assert (round(iv.low, 4), round(iv.high, 4)) == (-0.1186, -0.0046)
    assert "newcombe" in iv.method and "method 10" in iv.method


def test_newcombe_swapping_the_discordant_cells_mirrors_the_interval():
    a, b = newcombe_paired_interval(30, 9, 2, 10), newcombe_paired_interval(30, 2, 9, 10)
    assert a.value == pytest.approx(-b.value)
    assert (a.low, a.high) == pytest.approx((-b.high, -b.low))


def test_mcnemar_exact_p_matches_the_binomial_and_the_published_value():
    # two-sided exact conditional McNemar test for 6 vs 16 discordant pairs: P = 0.052479
    p = mcnemar_exact_p(6, 16)
    by_hand = min(1.0, 2 * sum(math.comb(22, i) for i in range(7)) / 2 ** 22)
    assert p == pytest.approx(by_hand, rel=1e-12)
    assert round(p, 6) == 0.052479
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)


def test_holm_adjustment_textbook_example():
    # sorted p: 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([]) == []
    assert holm_adjust([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_compare_paired_counts_the_table_and_claims_only_after_holm():
    base = [True] * 30 + [False] * 10
    worse = [True] * 18 + [False] * 12 + [False] * 10        # lost 12, gained 0
    c = compare_paired(base, worse)
    assert (c.both, c.gained, c.lost, c.neither, c.n) == (18, 0, 12, 10, 40)
    assert c.change.value == pytest.approx(-12 / 40) and c.change.high < 0
    assert c.mcnemar_p == pytest.approx(2 / 2 ** 12)
    slightly = compare_paired(base, [True] * 28 + [False] * 12)   # lost 2: not significant
    verdicts = holm_verdicts([c, slightly])
    assert verdicts[0][0] == "degraded" and verdicts[1][0] == "no significant change"
    same = compare_paired(base, base)
    assert same.change.value == 0 and same.mcnemar_p == 1.0
    assert same.change.low < 0 < same.change.high


def test_holm_can_withhold_a_claim_a_single_test_would_make():
    # p = 0.03 alone is "degraded" at 0.05; among 4 comparisons Holm needs p <= 0.0125
    base = [True] * 20
    lost5 = compare_paired(base + [False] * 20, [True] * 15 + [False] * 25)
    assert lost5.mcnemar_p == pytest.approx(2 / 32)
    lost6 = compare_paired(base + [False] * 20, [True] * 14 + [False] * 26)
    assert lost6.mcnemar_p < 0.05
    assert holm_verdicts([lost6])[0][0] == "degraded"
    same = compare_paired(base, base)
    assert holm_verdicts([lost6, same, same, same])[0][0] == "no significant change"


def test_compare_paired_needs_the_same_prompts():
    with pytest.raises(MoeszError, match="same non-empty prompt list"):
        compare_paired([True, False], [True])


tables = st.tuples(*[st.integers(0, 60)] * 4).filter(lambda t: sum(t) > 0)


@settings(max_examples=200, deadline=None)
@given(tables)
def test_newcombe_interval_is_ordered_and_inside_the_range(t):
    iv = newcombe_paired_interval(*t)
    assert -1.0 <= iv.low <= iv.value <= iv.high <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_contains_the_estimate(kn):
    k, n = kn
    iv = wilson_interval(k, n)
    assert 0.0 <= iv.low <= iv.value <= iv.high <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 80), st.integers(0, 80))
def test_mcnemar_is_symmetric_and_a_probability(b, c):
    p = mcnemar_exact_p(b, c)
    assert p == mcnemar_exact_p(c, b) and 0.0 < p <= 1.0
