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


@pytest.mark.parametrize("dtype", [jnp.float16])
def test_chunked_tied_head_equals_one_projection(dtype, monkeypatch):
    """On CPU a float16 tied head (no half-precision matmul kernel: XLA copies operands to float32)
    is projected in chunks of vocabulary rows: logits and the table's gradient equal those of one
    projection over the whole table; the input's gradient is a sum of per-chunk half-precision
    products, equal up to that rounding."""
    from glm_jax.modeling import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((96, 16)), dtype)

    def loss_and_grads():
        def loss(x, table):
            return jnp.sum(layers.tied_logits(x, table, dtype).astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, table)

    whole = loss_and_grads()
    monkeypatch.setattr(layers, "HEAD_CHUNK_ROWS", 32)  # 3 chunks of 32 rows
    chunked_logits = jax.jit(lambda x, t: layers.tied_logits(x, t, dtype)).lower(x, table).compile().as_text()
    assert "while" in chunked_logits  # the chunk loop really is there
    chunked = loss_and_grads()
    (loss, (grad_x, grad_table)), (chunked_loss, (chunked_grad_x, chunked_grad_table)) = whole, chunked
    assert float(loss) == float(chunked_loss)
    np.testing.assert_array_equal(np.asarray(grad_table, np.float32), np.asarray(chunked_grad_table, np.float32))
    scale = float(np.abs(np.asarray(grad_x)).max())
    np.testing.assert_allclose(np.asarray(chunked_grad_x), np.asarray(grad_x), rtol=0, atol=2 ** -6 * scale)
