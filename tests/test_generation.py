"""Cached generation: golden greedy tokens of the official implementation, cached steps == full
forward passes, ragged batches == single prompts, stopping, limits, streaming, buckets, blank
infilling and bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from glm_jax import GLMForCausalLM, generate, load_pretrained
from glm_jax.generation import fill_blanks, fill_blanks_text, generate_with_stats, stream_generate
from glm_jax.sharding import DEFAULT_RULES, logical_shardings, make_mesh
from glm_jax.pretrained import abstract_params
from decoding_helpers import chat_model, chat_model_dir, chat_tok  # noqa: F401 (fixtures)
from parity_helpers import greedy_without_cache

ATOL, RTOL = 5e-4, 1e-4  # golden tolerances (golden README)
STEPS = 16


def unpadded(ids: np.ndarray, keep: np.ndarray) -> list[list[int]]:
    return [[int(t) for t, k in zip(row, mask) if k] for row, mask in zip(ids, keep)]


def golden_prompts(cases, case: str, pad_id: int) -> list[list[int]]:
    ids = cases[f"{case}/input_ids"]
    keep = cases[f"{case}/attention_mask"] != 0 if f"{case}/attention_mask" in cases and cases[
        f"{case}/attention_mask"].ndim == 2 else ids != pad_id
    return unpadded(ids, keep)


# ------------------------------------------------------------------------------- golden tokens


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill", "c_batch_leftpad"])
def test_greedy_matches_official_chatglm6b(chatglm6b, cases6b, case):
    model, params = chatglm6b
    prompts = golden_prompts(cases6b, case, model.config.pad_token_id)
    out = generate_with_stats(model, params, prompts, max_new_tokens=STEPS, keep_logits=True)
    length = cases6b[f"{case}/input_ids"].shape[1]
    assert out.sequences == cases6b[f"{case}/gen_sequences"][:, length:].tolist()
    # The official cached step logits (gen_scores [steps, B, V]).
    np.testing.assert_allclose(np.stack(out.logits, axis=1), cases6b[f"{case}/gen_scores"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["a_single", "c_batch_leftpad"])
def test_greedy_matches_official_chatglm2(chatglm2, cases2, case):
    model, params = chatglm2
    prompts = golden_prompts(cases2, case, model.config.pad_token_id)
    out = generate_with_stats(model, params, prompts, max_new_tokens=STEPS, keep_logits=True)
    length = cases2[f"{case}/input_ids"].shape[1]
    assert out.sequences == cases2[f"{case}/gen_sequences"][:, length:].tolist()
    np.testing.assert_allclose(np.stack(out.logits, axis=1), cases2[f"{case}/gen_scores"], atol=1e-4, rtol=RTOL)


@pytest.mark.parametrize("case,prefix", [("e1_ptuning_noproj", "pre4_noproj"), ("e2_ptuning_proj", "pre4_proj")])
def test_greedy_with_ptuning_prefix_matches_official(golden6b, cases6b, case, prefix):
    model, params = load_pretrained(str(golden6b / "checkpoint"), prefix=str(golden6b / "ptuning" / prefix))
    ids = cases6b[f"{case}/input_ids"]
    assert generate(model, params, ids.tolist(), max_new_tokens=STEPS) == cases6b[f"{case}/gen_sequences"][:, ids.shape[1]:].tolist()


def test_sharded_generation_matches_official(chatglm6b, cases6b):
    """Params, activations and the KV cache laid out on a (data 2, fsdp 2, tensor 2) mesh."""
    model, params = chatglm6b
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, logical_shardings(abstract_params(model), mesh, DEFAULT_RULES))
    prompts = golden_prompts(cases6b, "c_batch_leftpad", model.config.pad_token_id) * 4
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        tokens = generate(model, sharded, prompts, max_new_tokens=STEPS)
    length = cases6b["c_batch_leftpad/input_ids"].shape[1]
    assert tokens == cases6b["c_batch_leftpad/gen_sequences"][:, length:].tolist() * 4


# ------------------------------------------------------------------ cache == full forward pass


def full_forward_step_logits(model, params, prompts, generated):
    """Logits that chose each generated token, from ONE forward pass over prompt + generated tokens
    (left-padded, positions/mask derived from the padding mask; no cache)."""
    sequences = [p + g for p, g in zip(prompts, generated)]
    width = max(map(len, sequences))
    ids = np.full((len(sequences), width), model.config.pad_token_id or 0, np.int32)
    padding = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        padding[row, width - len(seq):] = 1
    logits = np.asarray(jax.jit(lambda t, m: model.apply({"params": params}, t, attention_mask=m))(ids, padding))
    steps = len(generated[0])
    return logits[:, width - steps - 1 : width - 1]


@pytest.mark.parametrize("case", ["a_gmask_single", "b_mask_infill", "c_batch_leftpad"])
def test_cached_decode_equals_full_forward_chatglm6b(chatglm6b, cases6b, case):
    model, params = chatglm6b
    prompts = golden_prompts(cases6b, case, model.config.pad_token_id)
    if case == "c_batch_leftpad":  # make the batch more ragged
        prompts = prompts + [prompts[0][2:], prompts[1][:3] + prompts[1][-4:]]
    out = generate_with_stats(model, params, prompts, max_new_tokens=24, stop_ids=(), keep_logits=True)
    expected = full_forward_step_logits(model, params, prompts, out.sequences)
    np.testing.assert_allclose(np.stack(out.logits), expected, atol=1e-4, rtol=0)


def test_cached_decode_equals_full_forward_chatglm2(chatglm2, cases2):
    model, params = chatglm2
    prompts = golden_prompts(cases2, "c_batch_leftpad", model.config.pad_token_id)
    prompts = prompts + [prompts[1][3:]]
    out = generate_with_stats(model, params, prompts, max_new_tokens=24, stop_ids=(), keep_logits=True)
    expected = full_forward_step_logits(model, params, prompts, out.sequences)
    np.testing.assert_allclose(np.stack(out.logits), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- batch behaviour


def test_ragged_batch_rows_equal_single_prompts(chatglm6b, cases6b):
    model, params = chatglm6b
    prompts = [
        *golden_prompts(cases6b, "c_batch_leftpad", 3),
        cases6b["a_gmask_single/input_ids"][0].tolist(),
        cases6b["b_mask_infill/input_ids"][0].tolist(),
    ]
    batched = generate(model, params, prompts, max_new_tokens=12)
    assert batched == [generate(model, params, [p], max_new_tokens=12)[0] for p in prompts]
    sampled = dict(do_sample=True, temperature=0.8, top_k=20, max_new_tokens=12)
    assert generate(model, params, prompts, **sampled, seed=3) == generate(model, params, prompts, **sampled, seed=3)


def test_stop_token_ends_each_row_on_its_own(chatglm6b, cases6b):
    model, params = chatglm6b
    prompts = golden_prompts(cases6b, "c_batch_leftpad", 3) + [cases6b["a_gmask_single/input_ids"][0].tolist()]
    golden = [*cases6b["c_batch_leftpad/gen_sequences"][:, 11:].tolist(), cases6b["a_gmask_single/gen_sequences"][0, 8:].tolist()]
    stop = 1118  # a's 2nd token; absent from c's outputs
    assert all(stop not in row for row in golden[:2])
    tokens = generate(model, params, prompts, max_new_tokens=STEPS, stop_ids=(stop,))
    assert tokens == [golden[0], golden[1], golden[2][: golden[2].index(stop) + 1]]


def test_max_length_and_context_window(chatglm6b, cases6b):
    model, params = chatglm6b
    prompt = cases6b["a_gmask_single/input_ids"][0].tolist()
    golden = cases6b["a_gmask_single/gen_sequences"][0, 8:].tolist()
    assert generate(model, params, [prompt], max_length=len(prompt) + 5) == [golden[:5]]
    assert generate(model, params, [prompt], max_new_tokens=7, max_length=100) == [golden[:7]]
    small = GLMForCausalLM(model.config.replace(max_sequence_length=12))
    assert generate(small, params, [prompt], max_new_tokens=STEPS) == [golden[:4]]  # 8 + 4 = context
    with pytest.raises(ValueError, match="prompt 0 has 12 tokens; the context holds 12"):
        generate(small, params, [[10] * 10 + prompt[-2:]], max_new_tokens=1)


def test_stream_generate_yields_what_generate_returns(chatglm6b, cases6b):
    model, params = chatglm6b
    prompt = cases6b["b_mask_infill/input_ids"][0].tolist()
    for settings in (dict(), dict(do_sample=True, top_p=0.9, temperature=1.3, seed=11)):
        expected = generate(model, params, [prompt], max_new_tokens=10, **settings)[0]
        for per_yield in (1, 4):
            pieces = list(stream_generate(model, params, prompt, max_new_tokens=10, tokens_per_yield=per_yield, **settings))
            assert [t for piece in pieces for t in piece] == expected
            assert all(len(piece) <= per_yield for piece in pieces[1:]) and len(pieces[0]) == 1


def test_prompt_lengths_share_compiled_programs(chatglm6b, cases6b):
    model, params = chatglm6b
    a = cases6b["a_gmask_single/input_ids"][0].tolist()
    first = generate_with_stats(model, params, [a], max_new_tokens=5, top_p=0.5)
    longer = generate_with_stats(model, params, [[20, 21, 22] + a], max_new_tokens=7, top_p=0.5)
    assert first.prompt_bucket == longer.prompt_bucket == 16 and first.new_token_bucket == longer.new_token_bucket
    assert longer.compile_seconds == 0.0
    custom = generate_with_stats(model, params, [a], max_new_tokens=5, prompt_buckets=[9, 40])
    assert custom.prompt_bucket == 9 and custom.sequences == first.sequences


# --------------------------------------------------------------------------------- infilling


def test_fill_one_blank_matches_official_infill(chatglm6b, cases6b):
    model, params = chatglm6b
    ids = cases6b["b_mask_infill/input_ids"][0].tolist()  # text [MASK] text <sop>
    golden = cases6b["b_mask_infill/gen_sequences"][0, len(ids):].tolist()
    at = ids.index(model.config.mask_token_id)
    filled = fill_blanks(model, params, ids[:-1], max_new_tokens=STEPS)
    assert filled == ids[:at] + golden + ids[at + 1 : -1]


def test_fill_two_blanks_left_to_right(chatglm6b):
    model, params = chatglm6b
    mask, sop = model.config.mask_token_id, model.config.bos_token_id
    prompt = [700, 475, mask, 101, 1085, 156, mask, 970, 44]
    expected = list(prompt)
    for _ in range(2):  # reference: no-cache greedy over the prompt with the first blank targeted
        sequence, _ = greedy_without_cache(model, params, np.array([expected + [sop]]), 6)
        at = expected.index(mask)
        expected = expected[:at] + sequence[0, len(expected) + 1 :].tolist() + expected[at + 1 :]
    assert fill_blanks(model, params, prompt, max_new_tokens=6, stop_ids=()) == expected


def test_fill_blanks_text_splices_spans_into_the_text(chat_model, chat_tok):  # noqa: F811
    model, params = chat_model
    cfg = model.config
    text = "今天天气很好：[MASK]，我们去[MASK]散步吧。"
    pieces = text.split("[MASK]")
    ids = [chat_tok.encode(p, add_special_tokens=False) for p in pieces]
    context, spans = ids[0] + [cfg.mask_token_id] + ids[1] + [cfg.mask_token_id] + ids[2], []
    for _ in range(2):  # each blank in turn, as the first [MASK] of the current context
        span = [t for t in generate(model, params, [context + [cfg.bos_token_id]], max_new_tokens=5)[0]
                if t != cfg.eos_token_id]
        at = context.index(cfg.mask_token_id)
        context = context[:at] + span + context[at + 1:]
        spans.append(chat_tok.decode(span))
    filled = fill_blanks_text(model, params, chat_tok, text, max_new_tokens=5)
    assert filled == pieces[0] + spans[0] + pieces[1] + spans[1] + pieces[2]


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompts,settings,message",
    [
        ([], dict(max_new_tokens=4), "prompts is empty"),
        ([[]], dict(max_new_tokens=4), "prompt 0 is empty"),
        ("hello", dict(max_new_tokens=4), "list of token-id lists"),
        ([[5, 1401, 1404], [5, 99999, 1401, 1404]], dict(max_new_tokens=4), "prompt 1 has token id 99999 outside"),
        ([[5, -1, 1401, 1404]], dict(max_new_tokens=4), "token id -1 outside"),
        ([[5, 6, 1401]], dict(max_new_tokens=4), "prompt 0 has no <sop>"),
        ([[5, 6, 1404]], dict(max_new_tokens=4), "neither \\[gMASK\\]"),
        ([[5] * 2047 + [1401, 1404]], dict(max_new_tokens=4), "prompt 0 has 2049 tokens; the context holds 2048"),
        ([[5, 1401, 1404]], dict(), "give max_new_tokens or max_length"),
        ([[5, 1401, 1404]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        ([[5, 1401, 1404]], dict(max_length=3), "max_length=3 leaves no room"),
        ([[5, 1401, 1404]], dict(max_new_tokens=4, top_p=0.0), "top_p must be in"),
        ([[5, 1401, 1404]], dict(max_new_tokens=4, do_sample=True, temperature=-1.0), "temperature must be"),
        ([[5, 1401, 1404]], dict(max_new_tokens=4, prompt_buckets=[2]), "no prompt bucket holds 3 tokens"),
    ],
)
def test_bad_input_is_rejected(chatglm6b, prompts, settings, message):
    model, params = chatglm6b
    with pytest.raises(ValueError, match=message):
        generate(model, params, prompts, **settings)


def test_bad_blank_prompts_are_rejected(chatglm6b, chatglm2):
    model, params = chatglm6b
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        fill_blanks(model, params, [5, 6, 7], max_new_tokens=2)
    with pytest.raises(ValueError, match="no \\[gMASK\\] and no <sop>"):
        fill_blanks(model, params, [5, 1400, 1401], max_new_tokens=2)
    with pytest.raises(ValueError, match="causal"):
        fill_blanks(*chatglm2, [5, 6], max_new_tokens=2)
