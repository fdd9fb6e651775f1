"""Structural identities of the model: the scanned stack equals a per-layer loop, and sharded
execution on a simulated 8-device mesh equals single-device execution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.modeling.transformer import GLMBlock
from glm_jax.modeling.layers import Norm, rotary_angles
from glm_jax.positions import positions_and_mask
from glm_jax.pretrained import abstract_params
from glm_jax.sharding import DEFAULT_RULES, logical_shardings, make_mesh


def unrolled_logits(model, params, input_ids):
    """The same network written as an explicit Python loop over layers with per-layer params."""
    cfg = model.config
    positions, mask = positions_and_mask(cfg, input_ids)
    x = params["word_embeddings"]["embedding"][input_ids]
    rope = rotary_angles(cfg, positions)
    for layer in range(cfg.num_layers):
        layer_params = jax.tree.map(lambda leaf: leaf[layer], params["layers"])
        x, _ = GLMBlock(cfg).apply({"params": layer_params}, x, jnp.int32(layer), None, rope, mask)
    x = Norm(cfg).apply({"params": params["final_norm"]}, x)
    return x @ params["word_embeddings"]["embedding"].T


def test_scanned_stack_equals_unrolled_loop(chatglm6b, cases6b):
    model, params = chatglm6b
    ids = cases6b["d_train_loss/input_ids"]
    scanned = model.apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled_logits(model, params, ids)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=1, tensor=4), dict(data=1, fsdp=8, tensor=1)])
def test_sharded_forward_equals_unsharded(chatglm6b, cases6b, mesh_shape):
    assert jax.device_count() == 8, "conftest requests 8 simulated CPU devices"
    model, params = chatglm6b
    mesh = make_mesh(**mesh_shape)
    shardings = logical_shardings(abstract_params(model), mesh, DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    ids = np.concatenate([cases6b["c_batch_leftpad/input_ids"]] * 4)  # batch 8 splits over data x fsdp
    padding = (ids != model.config.pad_token_id).astype(np.int32)

    def forward(p, tokens, pad):
        return model.apply({"params": p}, tokens, attention_mask=pad)

    with jax.set_mesh(mesh):
        import flax.linen as nn

        with nn.logical_axis_rules(DEFAULT_RULES):
            logits = jax.jit(forward, in_shardings=(shardings, None, None))(sharded, ids, padding)
    if mesh_shape["tensor"] > 1:  # the vocab / heads really are split across devices
        assert not sharded["word_embeddings"]["embedding"].sharding.is_fully_replicated
    expected = forward(params, ids, padding)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[:2], cases6b["c_batch_leftpad/logits"], atol=5e-4, rtol=1e-4)
