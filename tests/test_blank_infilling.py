"""GLM blank infilling (spec §4.1–4.2): layouts, statistics, masks and the resumable loader.

References are written from the spec independently of the code under test: the paper's worked
example, scipy's Poisson pmf, the `sep` attention rule written as a double loop, and the round trip
"fill every mask of Part A with its Part B span gives back the document".
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from glm_jax.data.blank_infilling import (
    BlankInfillingConfig, SpecialIds, attention_mask, example_rng, layout_blocks, layout_generation,
    make_example, pack_examples,
)
from glm_jax.data.sources import BlankInfillingLoader, ExampleMaker, LoaderState, TokenCorpus

IDS = SpecialIds(mask=900, gmask=901, smask=902, sop=904, eop=905, pad=3, dblock=907)
MASKS = {IDS.mask, IDS.gmask, IDS.smask}
PERIOD = 7  # the sentence-ending token of the synthetic vocabulary
SENTENCE_END = np.zeros(1000, bool)
SENTENCE_END[PERIOD] = True


def _document(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(10, 800, size=n).astype(np.int32)


def _reconstruct(example) -> np.ndarray:
    """The original document, rebuilt from Part A and Part B through the positions alone."""
    sep = example.sep
    part_a = example.input_ids[:sep].tolist()
    positions, blocks = example.position_ids
    spans: dict[int, list[int]] = {}
    for t in range(sep, len(example)):
        if blocks[t] == 1:  # <sop>: a new span whose mask sits at Part A index positions[t]
            current = spans.setdefault(int(positions[t]), [])
        if example.targets[t] != IDS.eop:
            current.append(int(example.targets[t]))
    out = []
    for i, token in enumerate(part_a):
        out += spans[i] if token in MASKS and i in spans else [token]
    return np.array(out)


# --- the worked example of spec §4.1 -------------------------------------------------------------

def test_paper_worked_example():
    x1, x2, x3, x4, x5, x6 = 11, 12, 13, 14, 15, 16
    ex = layout_blocks(np.array([x1, x2, x3, x4, x5, x6]), [(4, 6), (2, 3)], IDS.mask, IDS)
    M, S, E = IDS.mask, IDS.sop, IDS.eop
    assert ex.sep == 5
    assert ex.input_ids.tolist() == [x1, x2, M, x4, M, S, x5, x6, S, x3]
    assert ex.position_ids[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert ex.position_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert ex.targets[5:].tolist() == [x5, x6, E, x3, E]
    assert ex.loss_mask.tolist() == [0] * 5 + [1] * 5


def test_other_shuffle_order_of_the_worked_example():
    ex = layout_blocks(np.arange(11, 17), [(2, 3), (4, 6)], IDS.mask, IDS)
    S, E = IDS.sop, IDS.eop
    assert ex.input_ids[5:].tolist() == [S, 13, S, 15, 16]
    assert ex.position_ids[0, 5:].tolist() == [2, 2, 4, 4, 4]
    assert ex.position_ids[1, 5:].tolist() == [1, 2, 1, 2, 3]
    assert ex.targets[5:].tolist() == [13, E, 15, 16, E]


def test_document_level_layout():
    # spec §4.2: source 0..n-1, [gMASK] at n, <sop> and the rest at n; blocks 0.. from [gMASK].
    ex = layout_generation(np.arange(20, 30), 4, IDS, IDS.gmask)
    G, S = IDS.gmask, IDS.sop
    assert ex.input_ids.tolist() == [20, 21, 22, 23, 24, 25, G, S, 26, 27, 28]
    assert ex.targets.tolist() == [20, 21, 22, 23, 24, 25, G, 26, 27, 28, 29]
    assert ex.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6]
    assert ex.position_ids[1].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert ex.sep == 7
    assert ex.loss_mask.tolist() == [0] * 7 + [1] * 4


def test_block_noise_replaces_part_b_inputs_only():
    noise = np.array([True, False, True])  # over Part B span tokens: x5 x6 | x3
    ex = layout_blocks(np.arange(11, 17), [(4, 6), (2, 3)], IDS.mask, IDS, block_noise=noise)
    D = IDS.dblock
    assert ex.input_ids[5:].tolist() == [IDS.sop, D, 16, IDS.sop, D]
    assert ex.targets[5:].tolist() == [15, 16, IDS.eop, 13, IDS.eop]  # targets keep the real tokens


# --- statistics of the token-level mode ----------------------------------------------------------

def test_span_lengths_follow_truncated_poisson_and_cover_15_percent():
    config = BlankInfillingConfig()
    rng = np.random.default_rng(0)
    lengths, fractions = [], []
    for index in range(3000):
        n = int(rng.integers(40, 400))
        ex = make_example(_document(rng, n), example_rng(1, (index,)), config, IDS, mode="bert")
        starts = np.flatnonzero(ex.position_ids[1] == 1)
        ends = np.flatnonzero(ex.targets == IDS.eop)
        span_lengths = (ends - starts).tolist()
        assert np.count_nonzero(ex.input_ids[:ex.sep] == IDS.mask) == len(span_lengths)
        assert sum(span_lengths) >= int(0.15 * n)
        lengths += span_lengths
        fractions.append(sum(span_lengths) / n)
    lengths = np.array(lengths)
    assert lengths.min() >= 1 and lengths.max() <= 39
    support = np.arange(1, 40)
    pmf = stats.poisson.pmf(support, 3.0)
    pmf /= pmf.sum()
    observed = np.bincount(lengths, minlength=40)[1:]
    # Pearson chi-square over the well-populated lengths (1..9), the rest pooled.
    expected = pmf * len(lengths)
    obs = np.append(observed[:9], observed[9:].sum())
    exp = np.append(expected[:9], expected[9:].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < stats.chi2.ppf(0.999, df=len(obs) - 1), (obs, exp)
    assert np.mean(fractions) >= 0.15


def test_examples_round_trip_to_the_document_in_every_mode():
    config = BlankInfillingConfig(bert_prob=0.4, gap_sentence_prob=0.3, block_mask_prob=0.0)
    rng = np.random.default_rng(1)
    seen = set()
    for index in range(300):
        doc = _document(rng, int(rng.integers(10, 120)))
        doc[rng.random(len(doc)) < 0.1] = PERIOD
        ex = make_example(doc, example_rng(2, (index,)), config, IDS, SENTENCE_END)
        seen.add(ex.mode)
        np.testing.assert_array_equal(_reconstruct(ex), doc)
        assert ex.loss_mask.sum() == len(ex) - ex.sep and not ex.loss_mask[:ex.sep].any()
        positions, blocks = ex.position_ids
        assert (blocks[:ex.sep] == 0).all()
        if ex.mode == "sentence":
            assert set(ex.input_ids[:ex.sep].tolist()) & MASKS <= {IDS.smask}
            spans = np.split(ex.targets[ex.sep:], np.flatnonzero(ex.targets[ex.sep:] == IDS.eop)[:-1] + 1)
            # whole sentences: each span ends with the period or at the end of the document
            for span in spans:
                assert span[-2] == PERIOD or np.array_equal(span[:-1], doc[len(doc) - len(span) + 1:])
    assert seen == {"bert", "sentence", "gpt"}


def test_document_level_lengths():
    config = BlankInfillingConfig(bert_prob=0.0, gpt_min_ratio=0.5)
    rng = np.random.default_rng(3)
    layouts = set()
    for index in range(200):
        n = int(rng.integers(10, 100))
        ex = make_example(_document(rng, n), example_rng(4, (index,)), config, IDS)
        assert ex.mode == "gpt"
        scored = int(ex.loss_mask.sum())
        infill = ex.targets[-1] != IDS.eop
        layouts.add(bool(infill))
        generated = scored if infill else scored - 1
        assert int(0.5 * n) <= generated <= n - 2
        assert np.count_nonzero(np.isin(ex.input_ids, [IDS.gmask])) == 1
    assert layouts == {True, False}  # gpt_infill_prob 0.5: both implementations occur


def test_example_is_a_pure_function_of_its_key():
    config = BlankInfillingConfig(bert_prob=0.5, gap_sentence_prob=0.2, block_mask_prob=0.1)
    doc = _document(np.random.default_rng(5), 80)
    doc[::9] = PERIOD
    a = make_example(doc, example_rng(7, (3, 11, 0)), config, IDS, SENTENCE_END)
    b = make_example(doc, example_rng(7, (3, 11, 0)), config, IDS, SENTENCE_END)
    for field in ("input_ids", "targets", "loss_mask", "position_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    others = [make_example(doc, example_rng(7, (3, 11, c)), config, IDS, SENTENCE_END) for c in range(1, 6)]
    assert any(len(o) != len(a) or (o.input_ids != a.input_ids).any() for o in others)


# --- attention mask and packing -------------------------------------------------------------------

def test_attention_mask_follows_the_sep_rule_per_segment():
    rng = np.random.default_rng(6)
    config = BlankInfillingConfig(bert_prob=0.5)
    examples = [make_example(_document(rng, n), example_rng(0, (n,)), config, IDS) for n in (12, 20, 9)]
    length = sum(len(e) for e in examples) + 5
    row = pack_examples(examples, length, IDS.pad)
    mask = attention_mask(row["segment_ids"][None], row["part_a"][None])[0, 0]

    expected = np.zeros((length, length), bool)
    start = 0
    for ex in examples:
        for i in range(len(ex)):
            for j in range(len(ex)):
                expected[start + i, start + j] = j < ex.sep or j <= i
        start += len(ex)
    np.testing.assert_array_equal(mask, expected)

    import jax.numpy as jnp

    jax_mask = attention_mask(jnp.asarray(row["segment_ids"][None]), jnp.asarray(row["part_a"][None]))
    np.testing.assert_array_equal(np.asarray(jax_mask)[0, 0], expected)


def test_packing_places_each_example_and_pads():
    rng = np.random.default_rng(8)
    examples = [make_example(_document(rng, n), example_rng(1, (n,)), BlankInfillingConfig(), IDS) for n in (15, 30)]
    row = pack_examples(examples, 64, IDS.pad)
    a, b = len(examples[0]), len(examples[1])
    np.testing.assert_array_equal(row["input_ids"][a:a + b], examples[1].input_ids)
    np.testing.assert_array_equal(row["position_ids"][:, a:a + b], examples[1].position_ids)
    assert row["segment_ids"].tolist() == [1] * a + [2] * b + [0] * (64 - a - b)
    assert (row["input_ids"][a + b:] == IDS.pad).all() and not row["loss_mask"][a + b:].any()
    assert row["loss_mask"].sum() == sum(e.loss_mask.sum() for e in examples)
    with pytest.raises(ValueError, match="do not fit"):
        pack_examples(examples, a + b - 1, IDS.pad)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="bert_prob \\+ gap_sentence_prob"):
        BlankInfillingConfig(bert_prob=0.8, gap_sentence_prob=0.4)
    with pytest.raises(ValueError, match="at least 3 tokens"):
        make_example(np.array([1, 2]), example_rng(0, (0,)), BlankInfillingConfig(), IDS)
    with pytest.raises(ValueError, match="needs an is_sentence_end"):
        make_example(np.arange(20, 40), example_rng(0, (0,)), BlankInfillingConfig(), IDS, mode="sentence")
    with pytest.raises(ValueError, match="spans overlap"):
        layout_blocks(np.arange(10, 20), [(2, 5), (4, 6)], IDS.mask, IDS)


# --- the loader ------------------------------------------------------------------------------------

def _loader(state=None, num_workers=0, **kwargs):
    rng = np.random.default_rng(9)
    docs = [_document(rng, int(rng.integers(5, 150))) for _ in range(40)]
    maker = ExampleMaker(BlankInfillingConfig(bert_prob=0.5), IDS, seq_len=64, seed=3)
    return BlankInfillingLoader(TokenCorpus(docs), maker, batch_size=4, state=state,
                                num_workers=num_workers, **kwargs)


def _take(loader, count):
    out = []
    for _ in range(count):
        out.append((next(loader), loader.state))
    loader.close()
    return out


def test_loader_resumes_exactly_from_its_state():
    full = _take(_loader(), 16)  # > one epoch of 40 documents
    assert full[-1][1].epoch >= 1
    resumed = _take(_loader(state=LoaderState.from_dict(full[4][1].to_dict())), 11)
    for (expected, _), (got, _) in zip(full[5:], resumed):
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])
    batch = full[0][0]
    assert batch["input_ids"].shape == (4, 64) and batch["position_ids"].shape == (4, 2, 64)
    assert (batch["segment_ids"].max(axis=1) >= 1).all()


def test_loader_workers_and_host_slices_match_the_single_process_stream():
    single = _take(_loader(), 3)
    parallel = _take(_loader(num_workers=2), 3)
    host1 = _take(_loader(process_index=1, process_count=2), 3)
    for (a, _), (b, _), (c, _) in zip(single, parallel, host1):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["position_ids"][2:], c["position_ids"])
