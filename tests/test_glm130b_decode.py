"""GLM-130B cached decoding (spec 3.1): positions from `<sop>` on stay at the blank's [MASK] / [sMASK]
position or count on after a [gMASK]; every decode step's logits equal one full forward pass over
the same tokens, and the positions fed equal the official `get_masks_and_position_ids` rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLMForCausalLM, generate, preset
from glm_jax.generation import generate_with_stats
from glm_jax.positions import next_position_ids
from test_generation import full_forward_step_logits
from test_glm130b import random_params

CFG = preset("glm130b-tiny")
MASK, GMASK, SMASK, SOP = CFG.mask_token_id, CFG.gmask_token_id, CFG.smask_token_id, CFG.bos_token_id
STEPS = 12

# (name, prompts): ragged batches so that left padding is exercised too.
PROMPTS = {
    "gmask": [[11, 12, 13, 14, 15, GMASK, SOP], [21, 22, GMASK, SOP]],
    "mask": [[31, 32, MASK, 33, 34, 35, 36, SOP], [41, MASK, 42, SOP]],
    "smask": [[51, 52, 53, SMASK, 54, SOP]],
}


@pytest.fixture(scope="module")
def tiny():
    import flax

    return GLMForCausalLM(CFG), flax.linen.unbox(random_params(CFG, seed=3))


def official_positions(prompt, new_tokens):
    """Positions of prompt + `new_tokens` generated tokens as the official `generate.py` builds them:
    `arange`, and with a [MASK]/[sMASK] blank every index from the `<sop>` on set to the mask position."""
    positions = np.arange(len(prompt) + new_tokens)
    blank = [i for i, t in enumerate(prompt) if t == MASK] or [i for i, t in enumerate(prompt) if t == SMASK]
    if blank:
        positions[prompt.index(SOP):] = blank[0]
    return positions


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_cached_decode_equals_full_forward(tiny, case):
    model, params = tiny
    prompts = PROMPTS[case]
    out = generate_with_stats(model, params, prompts, max_new_tokens=STEPS, stop_ids=(), keep_logits=True)
    assert all(len(seq) == STEPS for seq in out.sequences)
    expected = full_forward_step_logits(model, params, prompts, out.sequences)
    np.testing.assert_allclose(np.stack(out.logits), expected, atol=1e-4, rtol=0)


def test_decode_positions_follow_the_official_rule():
    """Each decode step's position from `next_position_ids`, fed the prompt's last position, equals
    the official position ids of the whole sequence, for every case."""
    for prompts in PROMPTS.values():
        for prompt in prompts:
            official = official_positions(prompt, STEPS)
            position = jnp.asarray([[official[len(prompt) - 1]]])
            for step in range(STEPS):
                fed = jnp.asarray([len(prompt) - 1 + step])
                position = next_position_ids(CFG, position, fed)
                assert int(position[0, 0]) == official[len(prompt) + step], (prompt, step)


def test_prompts_without_sop_are_refused(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="prompt 0 has no <sop>"):
        generate(model, params, [[11, 12, GMASK]], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs last_index"):
        next_position_ids(CFG, jnp.zeros((1, 1), jnp.int32))


def test_greedy_generate_equals_argmax_of_full_forward(tiny):
    """End to end: greedy `generate` picks, at every step, the argmax of a full forward pass over the
    prompt and the tokens it chose before (the [MASK] case, where positions stand still)."""
    model, params = tiny
    prompt = PROMPTS["mask"][0]
    tokens = generate(model, params, [prompt], max_new_tokens=6, stop_ids=())[0]
    apply = jax.jit(lambda ids: model.apply({"params": params}, ids))
    for step in range(6):
        ids = np.asarray([prompt + tokens[:step]], np.int32)
        assert int(np.argmax(apply(ids)[0, -1])) == tokens[step]
