"""Meshes and the one table that maps logical axis names onto them.

Params and key activations are annotated with logical names (`embed`, `q_heads`, `mlp`, ...); the
rules below place them on a `(data, fsdp, tensor)` mesh. Data parallel, FSDP and tensor parallel
are therefore mesh shapes, not code changes: `make_mesh(fsdp=8)` shards params over 8 devices,
`make_mesh(tensor=8)` splits heads and MLP columns instead. Multi-host runs call
`jax.distributed.initialize()` first and then build the same mesh over `jax.devices()`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: LogicalRules = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # decode cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_sequence", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh axes {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (e.g. 2 KV heads on a tensor axis of 4)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if dim % mesh.shape[a] == 0)
        size = int(np.prod([mesh.shape[a] for a in kept])) if kept else 1
        while kept and dim % size:
            kept = kept[:-1]
            size = int(np.prod([mesh.shape[a] for a in kept])) if kept else 1
        fitted.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (abstract) values boxed with logical names (e.g. `eval_shape(init)`)."""
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_tree))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _fit(spec, shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
