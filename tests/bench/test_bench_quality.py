"""Quality metrics on examples whose values are known by hand."""

import math

import pytest

from server.bench import quality as Q


def test_rouge_l_worked_example():
    # LCS("the cat sat", "the cat sat down") = 3: P = 1, R = 3/4, F1 = 6/7
    assert Q.rouge_l_f1("the cat sat", "the cat sat down") == pytest.approx(6 / 7)


def test_rouge_l_is_order_sensitive_and_ignores_case_and_punctuation():
    assert Q.rouge_l_f1("The CAT, sat!", "the cat sat") == pytest.approx(1.0)
    # LCS("a b c d", "d c b a") = 1 -> P = R = 1/4
    assert Q.rouge_l_f1("a b c d", "d c b a") == pytest.approx(0.25)
    assert Q.rouge_l_f1("", "x") == 0.0
    assert Q.rouge_l_f1("x y", "") == 0.0


def test_lcs_length():
    assert Q.lcs_length("ABCBDAB", "BDCABA") == 4
    assert Q.lcs_length([], [1, 2]) == 0


def test_rouge_l_corpus_takes_the_best_reference_and_averages():
    hyps = ["the cat sat", "x"]
    refs = [["dog", "the cat sat"], ["y"]]
    assert Q.rouge_l(hyps, refs) == pytest.approx(50.0)


def test_bleu_known_values():
    pytest.importorskip("sacrebleu")
    assert Q.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert Q.bleu(["completely different words here"], [["the cat sat on the mat"]]) == pytest.approx(0.0)
    partial = Q.bleu(["the cat sat on a mat today"], [["the cat sat on the mat"]])
    assert 0.0 < partial < 100.0


@pytest.mark.parametrize("text,expected", [
    ("He pays 400*.5=$200 more\nSo it cost 600+400=$1000 in total.\n#### 1000", 1000.0),
    ("The answer is $1,250.", 1250.0),
    ("so x = -3.5", -3.5),
    ("first 3 then 7", 7.0),
    ("#### 42\nfollowed by 99", 42.0),
    ("no number at all", None),
])
def test_extract_final_number(text, expected):
    assert Q.extract_final_number(text) == expected


def test_math_accuracy_against_gsm8k_style_references():
    refs = [["... #### 1000"], ["... #### 18"]]
    assert Q.math_accuracy(["The total is 1,000 dollars.", "It is 17."], refs) == 0.5


def test_agreement_with_off():
    off = [[1, 2, 3, 4], [5, 6]]
    got = Q.agreement([[1, 2, 9, 9], [5, 6]], off)
    assert got["match_off"] == 0.5
    assert got["prefix_agreement"] == pytest.approx((2 / 4 + 1.0) / 2)


def test_repetition_is_the_share_of_repeated_4_grams():
    assert Q.repeated_ngrams([1, 2, 3, 4, 5]) == 0.0
    assert Q.repeated_ngrams([1, 2, 3]) == 0.0  # no 4-gram
    # 1 2 3 4 | 1 2 3 4 1: 6 four-grams, 4 distinct (1234, 2341, 3412, 4123)
    assert Q.repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4, 1]) == pytest.approx(1 - 4 / 6)
    assert Q.repeated_ngrams([7] * 10) == pytest.approx(1 - 1 / 7)
    assert Q.repetition([[1, 2, 3, 4, 5], [7] * 10]) == pytest.approx((1 - 1 / 7) / 2)


def test_score_only_reports_metrics_with_references():
    items = [
        {"question_id": 1, "category": "summarization", "token_ids": [1], "text": "the cat sat", "references": ("the cat sat",)},
        {"question_id": 2, "category": "qa", "token_ids": [2], "text": "x", "references": ()},
    ]
    q = Q.score(items, {1: [1], 2: [3]})
    assert q["n"] == 2 and q["match_off"] == 0.5 and q["repetition"] == 0.0
    assert q["rouge_l"] == pytest.approx(100.0)
    assert "bleu" not in q and "math_accuracy" not in q
    assert "match_off" not in Q.score(items, None)
    assert math.isnan(Q.agreement([], [])["match_off"])
