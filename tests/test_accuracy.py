"""tinyserve.testing.accuracy: the KL, top-1 and perplexity sums, against direct formulas."""

from __future__ import annotations

import numpy as np

from tinyserve.testing.accuracy import CHUNK_ROWS, compare, ids_digest, paired_gap


def test_compare_matches_the_formulas_over_several_chunks():
    rng = np.random.default_rng(0)
    T, V = CHUNK_ROWS * 2 + 5, 40  # rows in three chunks
    ref = rng.standard_normal((T, V)).astype(np.float32) * 3
    eng = ref + rng.standard_normal((T, V)).astype(np.float32) * 0.3
    ids = rng.integers(0, V, size=T).tolist()

    p, q = np.exp(ref.astype(np.float64)), np.exp(eng.astype(np.float64))  # small logits: no max
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    nxt = np.asarray(ids[1:])
    acc = compare(ref, eng, ids)
    np.testing.assert_allclose(acc.kls, (p * np.log(p / q)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(acc.kl, acc.kls.mean())
    assert acc.top1 == (p.argmax(-1) == q.argmax(-1)).mean()
    np.testing.assert_array_equal(acc.disagree, np.flatnonzero(p.argmax(-1) != q.argmax(-1)))
    top2 = np.sort(np.log(p[acc.disagree]), axis=-1)[:, -2:]
    np.testing.assert_allclose(acc.margins, top2[:, 1] - top2[:, 0], rtol=1e-6)
    np.testing.assert_allclose(
        acc.perplexity, np.exp(-np.log(q[np.arange(T - 1), nxt]).mean()), rtol=1e-6
    )
    np.testing.assert_allclose(
        acc.reference_perplexity, np.exp(-np.log(p[np.arange(T - 1), nxt]).mean()), rtol=1e-6
    )


def test_an_engine_equal_to_the_reference_scores_perfectly():
    ref = np.random.default_rng(1).standard_normal((7, 11)).astype(np.float32)
    acc = compare(ref, ref.copy(), [1, 2, 3, 4, 5, 6, 7])
    assert acc.kl == 0 and acc.top1 == 1 and len(acc.disagree) == 0
    assert acc.perplexity == acc.reference_perplexity


def test_ids_digest_tells_token_lists_apart():
    assert ids_digest([1, 2, 3]) == ids_digest(np.array([1, 2, 3], dtype=np.int64))
    assert ids_digest([1, 2, 3]) != ids_digest([1, 2, 4])
    assert ids_digest([1, 2, 3]) != ids_digest([1, 2])


def test_paired_gap_reads_a_difference_against_its_own_noise():
    rng = np.random.default_rng(1)
    T = 400
    theirs = rng.exponential(3e-3, T)
    same_noise = theirs + rng.normal(0, 1e-3, T)  # no real difference
    gap = paired_gap(same_noise, [3, 7, 11], theirs, [3, 7, 12, 20])
    np.testing.assert_allclose(gap.kl, (same_noise - theirs).mean())
    np.testing.assert_allclose(gap.kl_se, (same_noise - theirs).std(ddof=1) / np.sqrt(T))
    assert (gap.only_first_off, gap.only_second_off) == (1, 2)
    np.testing.assert_allclose(gap.top1, 1 / T)
    assert gap.no_worse()
    worse = paired_gap(theirs * 1.5, list(range(40)), theirs, list(range(10)))
    assert worse.kl > 2 * worse.kl_se and worse.top1 < -2 * worse.top1_se
    assert not worse.no_worse()
