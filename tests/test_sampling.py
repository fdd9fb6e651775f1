"""Token choice: processors and warpers against NumPy references written from the Hugging Face rules
that the official `generate` runs (spec §1.9), plus seeds and the temperature -> 0 limit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from glm_jax.sampling import SamplingParams, choose_tokens, process_logits

V = 40


def np_top_k_keep(logits: np.ndarray, k: int) -> np.ndarray:
    """HF TopKLogitsWarper: remove scores < the k-th largest."""
    kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1 : k]
    return logits >= kth


def np_top_p_keep(logits: np.ndarray, top_p: float) -> np.ndarray:
    """HF TopPLogitsWarper: sort ascending, remove while cumulative probability <= 1 - top_p,
    always keep the most likely token."""
    keep = np.zeros(logits.shape, bool)
    for row, scores in enumerate(logits):
        order = np.argsort(scores)
        finite = np.isfinite(scores[order])
        probs = np.zeros(len(scores))
        exp = np.exp(scores[order][finite] - scores[order][finite].max())
        probs[finite] = exp / exp.sum()
        remove = np.cumsum(probs) <= 1 - top_p
        remove[-1] = False
        keep[row, order[~remove]] = True
    return keep & np.isfinite(logits)


def distinct_logits(seed: int, batch: int = 3) -> np.ndarray:
    """Rows of well-separated logits (no ties, no cumulative sum near a threshold by accident)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(V) * 0.37 + rng.normal(0, 0.01, V) for _ in range(batch)]).astype(np.float32)


def kept(logits: np.ndarray, **settings) -> np.ndarray:
    params = SamplingParams(do_sample=True, **settings)
    return np.isfinite(np.asarray(process_logits(logits, params.plan(V), params.values(), None)))


@pytest.mark.parametrize("k", [1, 2, 7, V - 1, V])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = distinct_logits(k)
    np.testing.assert_array_equal(kept(logits, top_k=k), np_top_k_keep(logits, k))
    assert (kept(logits, top_k=k).sum(-1) == k).all()


def test_top_k_larger_than_vocab_keeps_everything():
    assert kept(distinct_logits(0), top_k=V + 100).all()


def test_top_k_keeps_ties_at_the_boundary():
    logits = np.array([[3.0, 2.0, 2.0, 1.0, 0.0]], np.float32)
    params = SamplingParams(do_sample=True, top_k=2)
    out = np.asarray(process_logits(logits, params.plan(5), params.values(), None))
    np.testing.assert_array_equal(np.isfinite(out), [[True, True, True, False, False]])


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95, 0.999])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_p_keeps_the_nucleus(top_p, temperature):
    logits = distinct_logits(int(top_p * 100))
    expected = np_top_p_keep(logits / temperature, top_p)
    np.testing.assert_array_equal(kept(logits, top_p=top_p, temperature=temperature), expected)


@pytest.mark.parametrize("top_k,top_p", [(10, 0.5), (3, 0.999), (25, 0.8)])
def test_top_k_then_top_p(top_k, top_p):
    logits = distinct_logits(top_k)
    after_k = np.where(np_top_k_keep(logits, top_k), logits, -np.inf)
    np.testing.assert_array_equal(kept(logits, top_k=top_k, top_p=top_p), np_top_p_keep(after_k, top_p))


def test_top_p_one_keeps_everything():
    assert kept(distinct_logits(1), top_p=1.0).all()


def test_repetition_penalty_follows_hf_rule():
    logits = np.array([[2.0, -2.0, 1.0, -1.0, 0.5]], np.float32)
    seen = np.array([[True, True, False, False, True]])
    params = SamplingParams(repetition_penalty=2.0)
    out = np.asarray(process_logits(logits, params.plan(5), params.values(), seen))
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0, 0.25]])


def test_invalid_scores_put_all_mass_on_token_5():
    logits = np.zeros((2, 8), np.float32)
    logits[0, 3] = np.nan
    logits[1, 2] = 7.0
    params = SamplingParams()
    out = np.asarray(process_logits(logits, params.plan(8), params.values(), None))
    expected = np.zeros((2, 8), np.float32)
    expected[0, 5] = 5e4
    expected[1, 2] = 7.0  # a finite row is untouched
    np.testing.assert_array_equal(out, expected)
    sampled = SamplingParams(do_sample=True, temperature=0.7)
    tokens = choose_tokens(logits, jax.random.key(0), sampled.plan(8), sampled.values())
    assert int(tokens[0]) == 5


def _draw(logits, seed, **settings):
    params = SamplingParams(**settings)
    return np.asarray(choose_tokens(logits, jax.random.key(seed), params.plan(V), params.values()))


def test_greedy_is_argmax():
    logits = distinct_logits(5, batch=8)
    np.testing.assert_array_equal(_draw(logits, 0), logits.argmax(-1))
    np.testing.assert_array_equal(_draw(logits, 0, do_sample=True, temperature=0.0), logits.argmax(-1))


def test_temperature_to_zero_equals_greedy():
    logits = distinct_logits(6, batch=64)
    for seed in range(5):
        np.testing.assert_array_equal(_draw(logits, seed, do_sample=True, temperature=1e-3), logits.argmax(-1))


def test_fixed_seed_reproduces_and_seeds_differ():
    logits = np.zeros((64, V), np.float32)  # uniform: every draw is a coin toss
    a = _draw(logits, 7, do_sample=True)
    np.testing.assert_array_equal(a, _draw(logits, 7, do_sample=True))
    assert (a != _draw(logits, 8, do_sample=True)).any()


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    params = SamplingParams(do_sample=True, top_k=3)
    draw = jax.jit(jax.vmap(lambda key: choose_tokens(logits, key, params.plan(4), params.values())[0]))
    tokens = np.asarray(draw(jax.random.split(jax.random.key(0), 20000)))
    freq = np.bincount(tokens, minlength=4) / tokens.size
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-1), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(do_sample=True, **settings)
