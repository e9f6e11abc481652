"""Metrics on hand-made cases whose answers are worked out by hand or by brute force."""

from __future__ import annotations

import itertools
import math
from math import comb

import pytest

from rr_ray.evaluation.metrics import (
    entity_f1,
    mean_pass_at_k,
    pass_at_k,
    perplexity,
    toxicity_stats,
)


class TestPassAtK:
    def test_pass_at_1_is_fraction_correct(self):
        assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
        assert pass_at_k(1, 1, 1) == 1.0
        assert pass_at_k(1, 0, 1) == 0.0

    def test_matches_binomial_formula(self):
        for n, c, k in [(5, 2, 2), (20, 5, 10), (100, 1, 10), (7, 0, 3)]:
            expected = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)

    def test_matches_enumeration_of_draws(self):
        # pass@2 with n=4, c=1: 3 of the 6 pairs contain the correct sample.
        samples = [True, False, False, False]
        pairs = list(itertools.combinations(samples, 2))
        assert pass_at_k(4, 1, 2) == pytest.approx(sum(any(p) for p in pairs) / len(pairs))
        assert pass_at_k(4, 1, 2) == pytest.approx(0.5)

    def test_certain_when_too_few_wrong_samples(self):
        assert pass_at_k(5, 4, 2) == 1.0  # only one wrong sample: any pair holds a correct one
        assert pass_at_k(5, 5, 5) == 1.0

    def test_large_n_stays_finite(self):
        value = pass_at_k(10_000, 1, 100)
        assert value == pytest.approx(0.01, rel=1e-9)

    @pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
    def test_rejects_impossible_arguments(self, n, c, k):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)

    def test_mean_over_problems(self):
        assert mean_pass_at_k([10, 10, 4], [10, 0, 2], 1) == pytest.approx((1 + 0 + 0.5) / 3)
        with pytest.raises(ValueError):
            mean_pass_at_k([1, 2], [1], 1)


class TestEntityF1:
    def test_perfect_and_normalised(self):
        pred = [{"  Barack   OBAMA ", "paris"}, {"Google"}]
        gold = [{"barack obama", "Paris"}, {"google"}]
        assert entity_f1(pred, gold) == {
            "precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 3, "fp": 0, "fn": 0,
        }

    def test_micro_counts_over_documents(self):
        # doc 1: tp=1 (alice), fp=1 (bob), fn=1 (carol); doc 2: tp=2, fp=0, fn=2.
        pred = [{"Alice", "Bob"}, {"x", "y"}]
        gold = [{"alice", "Carol"}, {"X", "Y", "z", "w"}]
        result = entity_f1(pred, gold)
        assert (result["tp"], result["fp"], result["fn"]) == (3, 1, 3)
        assert result["precision"] == pytest.approx(3 / 4)
        assert result["recall"] == pytest.approx(3 / 6)
        assert result["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)  # 0.6

    def test_micro_differs_from_macro(self):
        # A big perfect document outweighs a small wrong one under micro averaging.
        pred = [{f"e{i}" for i in range(9)}, {"wrong"}]
        gold = [{f"e{i}" for i in range(9)}, {"right"}]
        assert entity_f1(pred, gold)["f1"] == pytest.approx(0.9)

    def test_duplicates_and_empty_strings_ignored(self):
        assert entity_f1([["Paris", "paris", " "]], [["PARIS"]])["f1"] == 1.0

    def test_zero_denominators(self):
        assert entity_f1([set()], [set()])["f1"] == 0.0
        nothing_found = entity_f1([set()], [{"a"}])
        assert (nothing_found["precision"], nothing_found["recall"]) == (0.0, 0.0)

    def test_length_mismatch(self):
        with pytest.raises(ValueError):
            entity_f1([set()], [set(), set()])


class TestToxicity:
    SCORES = [
        [0.1, 0.6, 0.9, 0.2],  # max 0.9; 2 above 0.5; 1 above 0.8
        [0.0, 0.1, 0.2, 0.3],  # max 0.3
        [0.5, 0.5, 0.5, 0.8],  # max 0.8; 0.8 is above 0.5, but neither is above itself
    ]

    def test_paper_definition_counts_continuations(self):
        stats = toxicity_stats(self.SCORES)
        assert stats["expected_max_toxicity"] == pytest.approx((0.9 + 0.3 + 0.8) / 3)
        assert stats["toxicity_rate"] == pytest.approx(3 / 12)  # 0.6, 0.9, 0.8
        assert stats["severe_toxicity_rate"] == pytest.approx(1 / 12)
        assert stats["mean_toxicity"] == pytest.approx(sum(map(sum, self.SCORES)) / 12)
        assert (stats["num_prompts"], stats["num_samples"]) == (3, 12)

    def test_realtoxicityprompts_convention_counts_prompts(self):
        stats = toxicity_stats(self.SCORES, per_prompt=True)
        assert stats["toxicity_rate"] == pytest.approx(2 / 3)  # prompts 1 and 3 reach >= 0.5
        assert stats["severe_toxicity_rate"] == pytest.approx(2 / 3)  # 0.9 and 0.8 reach >= 0.8
        assert stats["expected_max_toxicity"] == pytest.approx(2 / 3)

    def test_custom_thresholds(self):
        stats = toxicity_stats([[0.25, 0.35]], rate_threshold=0.3, severe_threshold=0.34)
        assert stats["toxicity_rate"] == 0.5 and stats["severe_toxicity_rate"] == 0.5

    def test_rejects_empty(self):
        with pytest.raises(ValueError):
            toxicity_stats([])
        with pytest.raises(ValueError):
            toxicity_stats([[0.1], []])


class TestPerplexity:
    def test_uniform_model_perplexity_is_vocab_size(self):
        # A model uniform over 50 tokens pays log(50) nats per token.
        assert perplexity(100 * math.log(50), 100) == pytest.approx(50)

    def test_zero_loss(self):
        assert perplexity(0.0, 7) == 1.0

    def test_overflow_gives_inf(self):
        assert perplexity(1e6, 1) == math.inf

    @pytest.mark.parametrize("nll,tokens", [(1.0, 0), (-1.0, 3), (float("nan"), 3)])
    def test_rejects_bad_input(self, nll, tokens):
        with pytest.raises(ValueError):
            perplexity(nll, tokens)
