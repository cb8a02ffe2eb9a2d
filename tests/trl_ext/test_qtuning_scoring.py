"""Q-Tuning's pure functions against slow references on hand-built and random batches."""

import math
import random
from fractions import Fraction

import pytest
import qtuning_reference as ref
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_ext.qtuning.batch import prune_labels, sample_ids_from_batch, select_samples
from trl_ext.qtuning.scoring import (
    assign_quadrants,
    round_half_up,
    sample_ppl_entropy,
    token_budget,
    token_keep_mask,
    token_nll_entropy,
    token_scores,
)


def _assert_assignment_matches_reference(ppl, ent, ratio):
    sel = assign_quadrants(torch.tensor(ppl, dtype=torch.float64), torch.tensor(ent, dtype=torch.float64), ratio)
    quad, a, num_filled = ref.assign(ppl, ent, ratio)
    assert sel.quadrant.tolist() == quad
    assert sel.num_filled == num_filled
    # The same ratio: a float here, the nearest fraction with a small denominator there.
    assert Fraction(sel.a).limit_denominator(4 * len(ppl)) == a
    thresholds = (ref.quantile(ppl, a), ref.quantile(ppl, 1 - a), ref.quantile(ent, a), ref.quantile(ent, 1 - a))
    got = (sel.ppl_low, sel.ppl_high, sel.ent_low, sel.ent_high)
    assert got == pytest.approx([float(t) for t in thresholds], rel=1e-12)
    assert sel.iterations <= math.ceil(math.log2(len(ppl))) + 1
    # Independent of the procedure: exactly round(r * B) kept, all of them in Q2 or Q4.
    k = min(len(ppl), max(1, math.floor(ratio * len(ppl) + 0.5)))
    assert int(sel.keep.sum()) == k
    assert sel.keep.tolist() == [q in (2, 4) for q in quad]
    return sel


# --------------------------------------------------------------------------- quantile ratio a and quadrants
def test_quadrants_of_a_clear_batch():
    # 8 samples, two per quadrant, far apart: at a = 1/2 (medians) exactly Q2 and Q4 are kept for r = 1/2.
    ppl = [20.0, 30.0, 25.0, 40.0, 1.1, 1.2, 1.3, 1.4]
    ent = [3.0, 3.5, 0.1, 0.2, 3.2, 3.1, 0.3, 0.15]
    sel = _assert_assignment_matches_reference(ppl, ent, 0.5)
    assert sel.quadrant.tolist() == [1, 1, 2, 2, 4, 4, 3, 3]
    assert sel.a == 0.5 and sel.num_filled == 0


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_a_is_the_largest_ratio_keeping_at_most_the_target(ties):
    # The brute force tries every ratio where a threshold reaches an observed score: quadrants, a and fillers must
    # match. B = 130 puts the breakpoints j / (B - 1) closer together than a bisection tolerance of 0.01.
    rng = random.Random(0)
    for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 33, 130]:
        for _ in range(1 if n == 130 else 4):
            if ties:
                ppl = [float(rng.randint(1, 4)) for _ in range(n)]
                ent = [float(rng.randint(0, 3)) for _ in range(n)]
            else:
                ppl = [math.exp(rng.gauss(1, 1)) for _ in range(n)]
                ent = [rng.uniform(0, 4) for _ in range(n)]
            for ratio in (0.1, 0.25, 0.5, 0.7, 1.0) if n < 130 else (0.25,):
                _assert_assignment_matches_reference(ppl, ent, ratio)


def test_a_sample_that_qualifies_exactly_at_a_breakpoint_is_selected_not_filled():
    # B = 8, k = 2: breakpoints at a = j/7. At a = 2/7, Q_a(H) = 2 (third-smallest entropy) and Q_{1-a}(PPL) = 7,
    # so samples 4 (PPL 9, H 2) and 7 (PPL 8, H 0) are Q2; just above 2/7, samples 5 and 2 join. A bisection on a
    # with tolerance 0.01 stops at 0.28125 < 2/7, keeps sample 7 only and fills with sample 2.
    ppl = [5.0, 6.0, 1.0, 3.0, 9.0, 7.0, 2.0, 8.0]
    ent = [8.0, 4.0, 6.0, 3.0, 2.0, 7.0, 1.0, 0.0]
    sel = _assert_assignment_matches_reference(ppl, ent, 0.25)
    assert sel.quadrant.tolist() == [0, 0, 0, 0, 2, 0, 3, 2]
    assert sel.num_filled == 0 and sel.a == pytest.approx(2 / 7)


def test_bisection_shrinks_a_when_the_medians_qualify_too_many():
    # Anti-correlated PPL and entropy: every sample is Q2 or Q4 at a = 1/2, so a must shrink below 1/2.
    # Q2 and Q4 grow in pairs here, so r = 0.2 (k = 4) is hit exactly and r = 0.25 (k = 5) needs one filler.
    ppl = [float(i) for i in range(1, 21)]
    ent = [float(20 - i) for i in range(20)]
    sel = _assert_assignment_matches_reference(ppl, ent, 0.2)
    assert sel.a < 0.5 and sel.num_filled == 0
    quad = ref.quadrants_at(ppl, ent, Fraction(sel.a).limit_denominator(80))
    assert sum(q in (2, 4) for q in quad) == 4
    sel = _assert_assignment_matches_reference(ppl, ent, 0.25)
    assert sel.num_filled == 1
    assert int(assign_quadrants(torch.tensor(ppl), torch.tensor(ent), 1.0).keep.sum()) == 20


def test_all_identical_scores_fill_in_index_order_as_q4():
    sel = _assert_assignment_matches_reference([2.0] * 6, [1.0] * 6, 0.5)
    # Nothing qualifies (PPL > Q is never true); fillers all have gap 0 and the PPL side is not larger.
    # The dropped ones sit on both medians, which counts as low & low (Q3).
    assert sel.quadrant.tolist() == [4, 4, 4, 3, 3, 3]
    assert sel.keep.tolist() == [True, True, True, False, False, False]
    assert sel.num_filled == 3


def test_ties_in_ppl_and_entropy():
    ppl = [3.0, 3.0, 3.0, 1.0, 1.0, 5.0, 5.0, 5.0]
    ent = [0.5, 0.5, 2.0, 2.0, 0.5, 0.5, 2.0, 2.0]
    for ratio in (0.125, 0.25, 0.5, 0.75):
        _assert_assignment_matches_reference(ppl, ent, ratio)


def test_fill_rule_prefers_the_largest_normalised_gap_and_labels_by_side():
    # Nothing is strictly above the PPL upper quantile at a=1/2 with these ties, so the fill rule decides.
    ppl = [1.0, 1.0, 9.0, 9.0]
    ent = [0.0, 4.0, 0.0, 4.0]
    sel = _assert_assignment_matches_reference(ppl, ent, 0.5)
    # p_n = [0, 0, 1, 1], h_n = [0, 1, 0, 1]: gaps 0, 1, 1, 0 -> samples 1 (entropy side: Q4) and 2 (PPL side: Q2).
    assert sel.quadrant.tolist()[1] == 4 and sel.quadrant.tolist()[2] == 2


def test_batch_size_one_keeps_the_sample_whole():
    sel = _assert_assignment_matches_reference([7.0], [0.3], 0.25)
    assert sel.quadrant.tolist() == [4] and sel.num_filled == 1


def test_round_half_up_and_budget():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49)] == [1, 2, 3, 2]
    assert token_budget(10, 0.25, 0.5) == 1  # 1.25
    assert token_budget(20, 0.25, 0.5) == 3  # 2.5 rounds up
    assert token_budget(3, 0.1, 0.1) == 1  # never zero


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ppl=torch.ones(3), entropy=torch.ones(2), sample_keep_ratio=0.5), "same length"),
        (dict(ppl=torch.ones(3), entropy=torch.ones(3), sample_keep_ratio=0.0), r"sample_keep_ratio=0.0"),
        (dict(ppl=torch.tensor([1.0, math.nan]), entropy=torch.ones(2), sample_keep_ratio=0.5), r"non-finite"),
        (dict(ppl=torch.ones(2), entropy=torch.tensor([math.inf, 1.0]), sample_keep_ratio=0.5), r"non-finite"),
    ],
)
def test_assign_quadrants_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_quadrants(**kwargs)


# --------------------------------------------------------------------------- per-token and per-sample scores
def test_token_nll_entropy_matches_softmax_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 1, 6, -100], [-100, -100, 2, -100, 0]])
    nll, ent, mask = token_nll_entropy(logits, labels)
    for r in range(2):
        for t in range(4):
            p = [math.exp(x) for x in logits[r, t].tolist()]
            z = sum(p)
            p = [x / z for x in p]
            label = labels[r, t + 1].item()
            if label == -100:
                assert not mask[r, t] and nll[r, t] == 0 and ent[r, t] == 0
                continue
            assert nll[r, t].item() == pytest.approx(-math.log(p[label]), rel=1e-5)
            assert ent[r, t].item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-5)


def test_sample_stats_with_padding_packing_and_one_token_samples():
    # Row 0: sample 0 (3 tokens) then padding; row 1: sample 1 (1 token), a separator, sample 2 (2 tokens).
    sample_ids = [[0, 0, 0, -1, -1], [1, -1, 2, 2, -1]]
    nll = [[0.1, 0.5, 2.0, 9.0, 9.0], [3.0, 9.0, 0.2, 0.4, 9.0]]
    ent = [[1.0, 2.0, 3.0, 9.0, 9.0], [0.5, 9.0, 1.5, 2.5, 9.0]]
    ppl, mean_ent, counts = sample_ppl_entropy(torch.tensor(nll), torch.tensor(ent), torch.tensor(sample_ids), 3)
    expected = ref.sample_stats(nll, ent, sample_ids)
    for s in range(3):
        assert ppl[s].item() == pytest.approx(expected[s][0], rel=1e-6)
        assert mean_ent[s].item() == pytest.approx(expected[s][1], rel=1e-6)
        assert counts[s].item() == expected[s][2]


def test_sample_stats_refuses_empty_samples():
    with pytest.raises(ValueError, match="at least one response token"):
        sample_ppl_entropy(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 0, 2]]), 3)


def test_token_scores_edges_gaps_and_single_tokens():
    ppl = [[2.0, 4.0, 8.0, 1.0, 1.0], [3.0, 5.0, 7.0, 9.0, 11.0]]
    sample_ids = [[0, 0, 0, -1, -1], [1, -1, 2, 2, 3]]  # one-token samples 1 and 3, adjacent samples 2 and 3
    got = token_scores(torch.tensor(ppl), torch.tensor(sample_ids), 0.5).tolist()
    want = ref.token_scores(ppl, sample_ids, 0.5)
    for g, w in zip(got, want):
        assert g == pytest.approx(w)
    assert got[0][0] == pytest.approx(0.5 * 2 + 0.5 * (2 + 4))  # left edge takes its own PPL
    assert got[1][0] == pytest.approx(1.5 * 3)  # a lone token: (1 - l) p + 2 l p
    assert got[1][4] == pytest.approx(1.5 * 11)  # its left neighbour belongs to another sample


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_token_scores_random_against_reference(lam):
    rng = random.Random(1)
    sample_ids = [[rng.choice([-1, 0, 0, 1, 1, 2]) for _ in range(9)] for _ in range(3)]
    ppl = [[rng.uniform(1, 10) for _ in range(9)] for _ in range(3)]
    got = token_scores(torch.tensor(ppl), torch.tensor(sample_ids), lam).tolist()
    for g, w in zip(got, ref.token_scores(ppl, sample_ids, lam)):
        assert g == pytest.approx(w)


def _keep_case(scores, sample_ids, quad, r_s, r_t):
    keep = torch.tensor([q in (2, 4) for q in quad])
    got = token_keep_mask(torch.tensor(scores), torch.tensor(sample_ids), torch.tensor(quad), keep, r_s, r_t)
    assert got.tolist() == ref.token_keep(scores, sample_ids, quad, r_s, r_t)
    return got


def test_token_keep_drops_highest_q2_tokens_and_never_q4():
    sample_ids = [[0, 0, 0, 0, -1], [1, 1, 1, -1, -1], [2, 2, 2, 2, 2], [3, 3, 3, 3, -1]]
    scores = [[5.0, 1.0, 9.0, 2.0, 0.0], [8.0, 8.0, 8.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [7, 6, 5, 4, 0.0]]
    quad = [2, 4, 1, 2]  # samples 0 and 3 are Q2, 1 is Q4, 2 dropped
    got = _keep_case(scores, sample_ids, quad, 0.5, 0.5)
    # 16 response tokens -> budget round(16 * 0.25) = 4; kept 4 + 3 + 4 = 11, so 7 Q2 tokens go.
    assert int(got.sum()) == 4
    assert got[1, :3].all()  # Q4 whole: only 1 of the 8 Q2 tokens survives, the lowest-scoring one
    assert got[0].tolist() == [False, True, False, False, False] and not got[3].any()


def test_token_keep_budget_unreachable_when_q4_alone_exceeds_it():
    got = _keep_case([[1.0, 2.0], [3.0, 4.0]], [[0, 0], [1, 1]], [4, 2], 0.5, 0.25)
    assert got.tolist() == [[True, True], [False, False]]


def test_token_keep_ties_drop_earlier_tokens_first():
    got = _keep_case([[1.0, 1.0, 1.0, 1.0]], [[0, 0, 0, 0]], [2], 1.0, 0.5)
    assert got.tolist() == [[False, False, True, True]]


def test_token_keep_random_against_reference():
    rng = random.Random(2)
    for _ in range(30):
        rows, cols = rng.randint(1, 4), rng.randint(1, 7)
        num = rng.randint(1, 4)
        sample_ids = [[rng.choice([-1, *range(num)]) for _ in range(cols)] for _ in range(rows)]
        present = sorted({s for row in sample_ids for s in row if s >= 0})
        if not present:
            continue
        remap = {s: i for i, s in enumerate(present)}
        sample_ids = [[remap.get(s, -1) for s in row] for row in sample_ids]
        quad = [rng.choice([0, 1, 2, 2, 3, 4]) for _ in present]
        scores = [[float(rng.randint(0, 3)) for _ in range(cols)] for _ in range(rows)]  # many ties
        _keep_case(scores, sample_ids, quad, rng.choice([0.25, 0.5, 1.0]), rng.choice([0.3, 0.5, 1.0]))


# --------------------------------------------------------------------------- batch layouts
def _examples():
    return [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10], "labels": [-100, 10]},
        {"input_ids": [11, 12, 13], "labels": [-100, -100, -100]},  # no response token: not a sample
        {"input_ids": [14, 15, 16, 17, 18], "labels": [-100, 15, 16, 17, 18]},
    ]


def test_sample_ids_padded_and_padding_free():
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(_examples())
    ids, docs = sample_ids_from_batch(padded)
    assert docs.tolist() == [0, 1, 3]
    assert ids.tolist() == [[-1, 0, 0, -1], [1, -1, -1, -1], [-1, -1, -1, -1], [2, 2, 2, 2]]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16)(_examples())
    ids, docs = sample_ids_from_batch(flat)
    assert docs.tolist() == [0, 1, 3]
    assert ids[0, :13].tolist() == [-1, 0, 0, -1, 1, -1, -1, -1, -1, 2, 2, 2, 2]
    assert (ids[0, 13:] == -1).all()


@pytest.mark.parametrize("padding_free", [False, True])
def test_select_samples_equals_collating_the_kept_examples(padding_free):
    examples = _examples()
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    batch = collator(examples)
    ids, docs = sample_ids_from_batch(batch)
    keep = torch.ones_like(ids, dtype=torch.bool)
    sub = select_samples(batch, docs[torch.tensor([False, True, True])], prune_labels(batch["labels"], keep))
    expected = collator([examples[1], examples[3]])
    assert sub.keys() == expected.keys()
    for key in expected:
        if torch.is_tensor(expected[key]):
            assert torch.equal(sub[key], expected[key]), key
        else:
            assert sub[key] == expected[key], key


def test_select_samples_keeps_pruned_tokens_as_context_and_trims_trailing_ones():
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(_examples())
    ids, docs = sample_ids_from_batch(batch)
    kept_docs = docs[torch.tensor([True, False, True])]
    keep = ids >= 0
    keep[0, 1] = False  # sample 0 loses the label 7 but keeps 8: token 7 stays in the input as context
    sub = select_samples(batch, kept_docs, prune_labels(batch["labels"], keep))
    assert sub["input_ids"].tolist() == [[5, 6, 7, 8, 0], [14, 15, 16, 17, 18]]
    assert sub["labels"].tolist() == [[-100, -100, -100, 8, -100], [-100, 15, 16, 17, 18]]
    keep = ids >= 0
    keep[0, 2] = False  # sample 0 loses its last label, sample 2 all but its first
    keep[3, 1:] = False
    sub = select_samples(batch, kept_docs, prune_labels(batch["labels"], keep))
    assert sub["input_ids"].tolist() == [[5, 6, 7], [14, 15, 16]]  # nothing after the last label is needed
    assert sub["labels"].tolist() == [[-100, -100, 7], [-100, 15, -100]]
    assert sub["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
