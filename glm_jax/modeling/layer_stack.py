"""Moving params between the stacked layout (`layers/...`, a leading layer axis: training, every
checkpoint) and the per-layer layout (`layers_0/... layers_{L-1}/...`) of `scan_layers=False`.

Why two layouts: a scanned stack dynamic-slices each layer's weights out of the stacked arrays, and
XLA:CPU materialises that slice, so every decode step copies all weights before reading them (about
three weight reads per token instead of one; static slices of a stacked array are no better).
Separate per-layer arrays are read in place. The per-layer blocks also store their float Linear
kernels output-major, `[*out, *in]` (`Linear.output_major`), the order in which a matrix-vector
product streams fastest. Conversions drop each source array as soon as its slices exist, so the
peak is one model plus one stacked leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from glm_jax.modeling.transformer import LAYER_PREFIX, GLMForCausalLM
from glm_jax.quantization import QUANTIZED_LINEARS, linear_in_dims

STACKED = "layers"


def is_unstacked(params: dict[str, Any]) -> bool:
    """Whether `params` holds per-layer blocks (`layers_0`, ...) rather than the stacked `layers`."""
    return f"{LAYER_PREFIX}0" in params


def model_for_params(model: GLMForCausalLM, params: dict[str, Any]) -> GLMForCausalLM:
    """`model`, with `scan_layers` set to match the layout of `params` (so either layout just works)."""
    scan = not is_unstacked(params)
    if model.config.scan_layers == scan:
        return model
    return GLMForCausalLM(model.config.replace(scan_layers=scan))


def _take_layer(leaf: Any, index: int) -> Any:
    if isinstance(leaf, np.ndarray):
        return np.array(leaf[index])  # a copy, so the stacked buffer can be freed
    return leaf[index]


def _linear_kernel_in_dims(path: tuple[Any, ...]) -> int:
    """Input axes of the float Linear kernel at `path` within one block; 0 for any other leaf."""
    names = tuple(getattr(entry, "key", entry) for entry in path)
    if names[-1:] != ("kernel",) or names[-3:-1] not in QUANTIZED_LINEARS:
        return 0
    return linear_in_dims(names[:-1])


def _permute(leaf: Any, axes: tuple[int, ...]) -> Any:
    if isinstance(leaf, np.ndarray):
        return np.ascontiguousarray(leaf.transpose(axes))
    return jax.numpy.transpose(leaf, axes)


def _output_major(kernel: Any, in_dims: int) -> Any:
    """`[*in, *out]` -> `[*out, *in]`."""
    return _permute(kernel, (*range(in_dims, kernel.ndim), *range(in_dims)))


def _input_major(kernel: Any, in_dims: int) -> Any:
    """`[*out, *in]` -> `[*in, *out]` (the inverse of `_output_major`)."""
    out_dims = kernel.ndim - in_dims
    return _permute(kernel, (*range(out_dims, kernel.ndim), *range(out_dims)))


def _stacked_leaf(path: tuple[Any, ...], leaf: Any) -> Any:
    """A per-layer leaf in the orientation of the stacked layout (Linear kernels input-major)."""
    in_dims = _linear_kernel_in_dims(path)
    return _input_major(leaf, in_dims) if in_dims else leaf


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The per-layer layout of stacked `params` (NumPy or jax leaves; other top-level entries kept).

    `params["layers"]` is popped and consumed leaf by leaf, so each stacked array is freed as soon as
    its slices exist (when nothing else holds it).
    """
    if is_unstacked(params):
        return params
    if STACKED not in params:
        raise ValueError(f"params have neither '{STACKED}' nor '{LAYER_PREFIX}0': not a GLM param tree")
    stacked = params.pop(STACKED)
    out = dict(params)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    del stacked
    in_dims = [_linear_kernel_in_dims(path) for path, _ in with_paths]
    flat = [leaf for _, leaf in with_paths]
    del with_paths
    num_layers = flat[0].shape[0]
    per_layer: list[list[Any]] = [[] for _ in range(num_layers)]
    for i in range(len(flat)):
        leaf, flat[i] = flat[i], None
        if leaf.shape[0] != num_layers:
            raise ValueError(f"stacked leaves disagree on the layer count: {leaf.shape[0]} vs {num_layers}")
        for layer in range(num_layers):
            taken = _take_layer(leaf, layer)
            per_layer[layer].append(_output_major(taken, in_dims[i]) if in_dims[i] else taken)
        del leaf
    for layer, leaves in enumerate(per_layer):
        out[f"{LAYER_PREFIX}{layer}"] = jax.tree.unflatten(treedef, leaves)
    return out


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The stacked layout of per-layer `params` (the inverse of `unstack_layers`)."""
    if not is_unstacked(params):
        return params
    count = 0
    while f"{LAYER_PREFIX}{count}" in params:
        count += 1
    layers = [jax.tree_util.tree_map_with_path(_stacked_leaf, params[f"{LAYER_PREFIX}{i}"]) for i in range(count)]
    out = {name: tree for name, tree in params.items() if not name.startswith(LAYER_PREFIX)}
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(layers[0])) else jax.numpy.stack
    out[STACKED] = jax.tree.map(lambda *xs: stack(xs), *layers)
    return out


__all__ = ["is_unstacked", "model_for_params", "stack_layers", "unstack_layers"]
