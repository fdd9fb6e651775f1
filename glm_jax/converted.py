"""This project's checkpoint directory ("converted" checkpoint): layout, streaming writer, readers.

A converted directory holds

* `glm_config.json` - the `GLMConfig` (its `param_dtype` is the stored float dtype, its
  `quantization_bit` says whether Linear weights are stored as int8 / packed int4 + scales);
* `params/` - an orbax PyTree checkpoint of the Flax params (layers stacked on axis 0), one zarr
  array per leaf, uncompressed, chunked by layer (and by the target sharding when one was given);
* `config.json` and the tokenizer / remote-code files of the official checkpoint it came from, so
  that it can be exported back to the official layout unchanged.

`load_pretrained` restores `params/` with orbax straight into the requested sharding and dtype (each
host reads only its shards). The writer never holds a whole leaf: a 3.7 GB stacked kernel is filled
layer by layer and chunk by chunk (whole chunks as zarr chunk files written with direct I/O, anything
else through tensorstore), and the finished arrays are then adopted into an orbax checkpoint (orbax
writes its own metadata), so conversion memory stays at about one tensor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fnmatch
import itertools
import json
import math
import os
import queue
import shutil
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from jax.sharding import Sharding

from glm_jax.config import GLMConfig
from glm_jax.hf_io import DIRECT_ALIGN, O_DIRECT, CheckpointError, aligned_empty, read_file_range

PARAMS_DIR = "params"
GLM_CONFIG_FILE = "glm_config.json"
_STAGING_DIR = "params.arrays"  # leaves being written, adopted into params/ by `ParamWriter.commit`

# Files of an official checkpoint directory kept beside the params: tokenizer, generation settings
# and the remote code (needed to load an exported directory with `trust_remote_code=True`).
AUX_FILE_PATTERNS = (
    "*.model", "*.tiktoken", "tokenizer*.json", "special_tokens_map.json", "added_tokens.json",
    "generation_config.json", "*.py",
)

Path = tuple[str, ...]


def is_converted_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, GLM_CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_glm_config(path: str) -> GLMConfig:
    file = os.path.join(path, GLM_CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            return GLMConfig.from_dict(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"not a converted checkpoint (no {GLM_CONFIG_FILE}): {path}") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is not a valid model config: {e}") from e


def write_glm_config(path: str, config: GLMConfig) -> None:
    """Stored params are always stacked, so the file says `scan_layers: true` whatever `config` says."""
    with open(os.path.join(path, GLM_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config.replace(scan_layers=True).to_dict(), f, indent=1, sort_keys=True)


def aux_files(directory: str) -> list[str]:
    """Names of the tokenizer / remote-code files in `directory` (see AUX_FILE_PATTERNS)."""
    names = [n for n in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, n))]
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in AUX_FILE_PATTERNS) and n != GLM_CONFIG_FILE]


def copy_aux_files(src: str, dst: str) -> list[str]:
    names = aux_files(src)
    for name in names:
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return names


# ------------------------------------------------------------------------------------------ writing


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Shape and stored dtype of one param leaf; `stacked` leaves have the layer axis first."""

    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool


def leaf_specs(shapes: Any) -> dict[Path, LeafSpec]:
    """Specs of every leaf of an (unboxed, abstract) param tree; leaves under `layers` are stacked."""
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {
        tuple(k.key for k in keys): LeafSpec(tuple(leaf.shape), np.dtype(leaf.dtype), keys[0].key == "layers")
        for keys, leaf in flat
    }


Region = tuple[tuple[int, int], ...]


def _chunk_shape(spec: LeafSpec, shard_shape: tuple[int, ...], max_bytes: int) -> tuple[int, ...]:
    """Per-layer chunks of the shard shape, halved along the first splittable axis until small.

    Halving keeps every shard a whole number of chunks, so each host writes and reads whole chunks.
    """
    chunk = list(shard_shape)
    first = 1 if spec.stacked else 0
    if spec.stacked:
        chunk[0] = 1
    while math.prod(chunk) * spec.dtype.itemsize > max_bytes:
        axis = next((a for a in range(first, len(chunk)) if chunk[a] % 2 == 0), None)
        if axis is None:
            break
        chunk[axis] //= 2
    return tuple(chunk)


def _owned_regions(
    shape: tuple[int, ...], sharding: Sharding | None, host: int, host_of: Callable[[Any], int]
) -> list[Region]:
    """Blocks of a leaf this host writes: one per distinct shard, owned by the first device holding it."""
    if sharding is None:
        return [tuple((0, n) for n in shape)] if host == 0 else []
    owners: dict[Region, Any] = {}
    for device, index in sorted(sharding.devices_indices_map(shape).items(), key=lambda item: item[0].id):
        region = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        owners.setdefault(region, device)
    return [region for region, device in owners.items() if host_of(device) == host]


@dataclasses.dataclass
class _StagedArray:
    """A finished zarr array waiting to be adopted into the orbax checkpoint."""

    path: str


class _AdoptArrays(ocp.type_handlers.NumpyHandler):
    """Orbax handler that *moves* already written zarr arrays into place instead of writing them.

    The arrays have the layout of orbax's own NumPy handler (zarr v2, no OCDBT), so the checkpoint
    restores with stock orbax as NumPy arrays or, with `ArrayRestoreArgs`, as sharded jax.Arrays.
    """

    async def serialize(self, values, infos, args=None):  # noqa: D102 - orbax TypeHandler API
        for value, info in zip(values, infos):
            await info.await_path_creation()
            if jax.process_index() == 0:
                await asyncio.to_thread(os.rename, value.path, os.fspath(info.parent_dir / info.name))
        return []


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _FileWriter:
    """Writes whole files on a background thread: directly (O_DIRECT) where the file system allows it.

    `put` returns once the data is queued - copied into an aligned buffer (and cast to `dtype`)
    unless it is an aligned array the caller promises not to touch again (`stable`). At most
    `budget` bytes wait at a time; a failed write is raised by the next `put` or by `close`.
    """

    def __init__(self, budget: int):
        self._budget, self._waiting = budget, 0
        self._condition = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._direct = bool(O_DIRECT)
        self._thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self._thread.start()

    def put(self, filename: str, data: np.ndarray, dtype: np.dtype, stable: bool) -> None:
        self._raise()
        aligned = data.flags.c_contiguous and data.__array_interface__["data"][0] % DIRECT_ALIGN == 0
        if not (stable and aligned and data.dtype == dtype):
            buffer = aligned_empty(data.size * dtype.itemsize)
            np.copyto(buffer.view(dtype).reshape(data.shape), data, casting="unsafe")
            data = buffer
        with self._condition:
            while self._waiting and self._waiting + data.nbytes > self._budget and self._error is None:
                self._condition.wait()
            self._waiting += data.nbytes
        self._queue.put((filename, data))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            filename, data = item
            try:
                if self._error is None:
                    self._write(filename, memoryview(data.reshape(-1).view(np.uint8)))
            except BaseException as e:  # handed to the producing thread
                self._error = e
            finally:
                with self._condition:
                    self._waiting -= data.nbytes
                    self._condition.notify_all()

    def _write(self, filename: str, raw: memoryview) -> None:
        direct = self._direct and len(raw) % DIRECT_ALIGN == 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(filename, flags | (O_DIRECT if direct else 0))
        try:
            done = 0
            while done < len(raw):
                try:
                    done += os.write(fd, raw[done:done + (256 << 20)])
                except OSError as e:
                    if not direct or e.errno != errno.EINVAL:
                        raise
                    os.close(fd)  # this file system refuses direct writes: use the page cache from now on
                    self._direct = direct = False
                    fd, done = os.open(filename, flags), 0
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Waits until every queued file is written; raises the first write error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def close_quietly(self) -> None:
        """Stops after the file being written (for a run that failed anyway)."""
        self._error = self._error or RuntimeError("stopped")
        self._queue.put(None)
        self._thread.join()


class ParamWriter:
    """Streams param leaves into `directory/params` without holding any leaf in memory.

    `write(path, value, layer=, start=)` stores rows `[start, start + len(value))` of one layer of a
    leaf. Whole chunks become zarr chunk files written on a background thread (O_DIRECT where
    possible); anything not aligned to the chunk grid goes through tensorstore. With `shardings` the
    arrays are chunked like the target sharding and this host (`host`, default `jax.process_index()`)
    writes only the shards whose first holder is one of its devices (`host_of(device)`);
    `owns_all(path)` tells whether that is the whole leaf. Use as a context manager: leaving it by
    an exception stops the background writes.
    """

    def __init__(
        self,
        directory: str,
        specs: dict[Path, LeafSpec],
        shardings: dict[Path, Sharding] | None = None,
        *,
        host: int | None = None,
        host_of: Callable[[Any], int] = lambda device: device.process_index,
        chunk_bytes: int = 64 << 20,
        max_pending_bytes: int = 256 << 20,
    ):
        self.directory = directory
        self.specs = specs
        self._staging = os.path.join(directory, _STAGING_DIR)
        self._pending: list[Any] = []
        host = jax.process_index() if host is None else host
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._stores: dict[Path, Any] = {}
        self._regions: dict[Path, list[Region]] = {}
        self._chunks: dict[Path, tuple[int, ...]] = {}
        os.makedirs(self._staging, exist_ok=True)
        opens = {}
        for path, spec in specs.items():
            sharding = shardings[path] if shardings is not None else None
            shard_shape = sharding.shard_shape(spec.shape) if sharding is not None else spec.shape
            self._chunks[path] = _chunk_shape(spec, shard_shape, chunk_bytes)
            self._regions[path] = _owned_regions(spec.shape, sharding, host, host_of)
            opens[path] = ts.open({
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": self._leaf_dir(path)},
                "dtype": spec.dtype.name,
                "metadata": {"shape": list(spec.shape), "chunks": list(self._chunks[path]), "compressor": None,
                             "order": "C", "dimension_separator": "."},
                "store_data_equal_to_fill_value": True,
            }, create=True, open=True, context=context)
        for path, future in opens.items():
            self._stores[path] = future.result()
        self._files = _FileWriter(max_pending_bytes)

    def __enter__(self) -> "ParamWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self._files.close_quietly()

    def _leaf_dir(self, path: Path) -> str:
        return os.path.join(self._staging, ".".join(path))

    def owns_all(self, path: Path) -> bool:
        total = math.prod(self.specs[path].shape)
        return sum(math.prod(b - a for a, b in region) for region in self._regions[path]) == total

    def slab_rows(self, path: Path) -> int:
        """Rows (along the per-layer leaf's first axis) of one chunk: the natural slab to write."""
        chunk = self._chunks[path]
        return chunk[1 if self.specs[path].stacked else 0] if len(chunk) > int(self.specs[path].stacked) else 1

    def write(self, path: Path, value: np.ndarray, *, layer: int | None = None, start: int = 0,
              stable: bool = False) -> None:
        """Writes `value` as rows `[start, start + len(value))` of `path` (of layer `layer` if stacked).

        `value` may be freed or released when this returns unless `stable`: then its memory stays
        unchanged until `commit`, which lets aligned chunks be written without a copy.
        """
        spec = self.specs[path]
        if spec.stacked != (layer is not None):
            raise ValueError(f"{'/'.join(path)}: layer={layer} for a {'stacked' if spec.stacked else 'plain'} leaf")
        expected = spec.shape[1:] if spec.stacked else spec.shape
        if value.shape[1:] != expected[1:] or start + value.shape[0] > expected[0]:
            raise ValueError(f"{'/'.join(path)}: rows {start}+{value.shape} do not fit the leaf shape {expected}")
        for region in self._regions[path]:
            if spec.stacked:
                (first, last), region = region[0], region[1:]
                if not first <= layer < last:
                    continue
            lo, hi = max(region[0][0], start), min(region[0][1], start + value.shape[0])
            if lo >= hi:
                continue
            rest = tuple(slice(a, b) for a, b in region[1:])
            block = value[(slice(lo - start, hi - start), *rest)]
            origin = ((layer,) if spec.stacked else ()) + (lo, *(a for a, _ in region[1:]))
            self._write_box(path, origin, block[None] if spec.stacked else block, stable)

    def _write_box(self, path: Path, origin: tuple[int, ...], box: np.ndarray, stable: bool) -> None:
        spec, chunk = self.specs[path], self._chunks[path]
        if any(o % c or n % c for o, n, c in zip(origin, box.shape, chunk)):
            target = tuple(slice(o, o + n) for o, n in zip(origin, box.shape))
            futures = self._stores[path][target].write(np.ascontiguousarray(box, dtype=spec.dtype))
            futures.copy.result()
            self._pending.append(futures.commit)
            return
        # Whole chunks: each is one file holding the chunk's C-order bytes (zarr v2, no compressor).
        for cell in itertools.product(*(range(0, n, c) for n, c in zip(box.shape, chunk))):
            piece = box[tuple(slice(i, i + c) for i, c in zip(cell, chunk))]
            name = ".".join(str((o + i) // c) for o, i, c in zip(origin, cell, chunk))
            self._files.put(os.path.join(self._leaf_dir(path), name), piece, spec.dtype, stable)

    def flush(self) -> None:
        """Waits until every write of this host is on disk (raising the first failure)."""
        self._files.close()
        for future in self._pending:
            future.result()
        self._pending.clear()

    def commit(self) -> None:
        """Waits for every write, then turns the arrays into the orbax checkpoint `directory/params`."""
        self.flush()
        self._stores.clear()
        _barrier("glm_jax.converted.written")
        tree: dict = {}
        for path in self.specs:
            node = tree
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = _StagedArray(os.path.join(self._staging, ".".join(path)))
        registry = ocp.type_handlers.create_type_handler_registry((_StagedArray, _AdoptArrays()))
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False, type_handler_registry=registry)
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(os.path.join(self.directory, PARAMS_DIR), args=ocp.args.PyTreeSave(tree))
        if jax.process_index() == 0:
            os.rmdir(self._staging)


# ------------------------------------------------------------------------------------------ reading


def _params_dir(path: str) -> str:
    return os.path.join(path, PARAMS_DIR)


def stored_leaves(path: str) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """`{leaf path: (shape, dtype)}` of a converted checkpoint, from orbax's metadata."""
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(_params_dir(path))).tree
    except Exception as e:  # orbax raises many types for a damaged checkpoint; name it once.
        raise CheckpointError(f"cannot read the orbax checkpoint {_params_dir(path)}: {type(e).__name__}: {e}") from e
    flat = jax.tree_util.tree_flatten_with_path(metadata)[0]
    return {tuple(k.key for k in keys): (tuple(m.shape), np.dtype(m.dtype)) for keys, m in flat}


def check_leaves(path: str, expected: dict[Path, tuple[int, ...]]) -> None:
    """Raises one CheckpointError listing every missing, unexpected or mis-shaped leaf."""
    found = stored_leaves(path)
    name = lambda p: "/".join(p)  # noqa: E731
    missing = sorted(name(p) for p in expected.keys() - found.keys())
    unexpected = sorted(name(p) for p in found.keys() - expected.keys())
    shapes = sorted(f"{name(p)}: expected {list(expected[p])}, got {list(found[p][0])}"
                    for p in expected.keys() & found.keys() if tuple(expected[p]) != found[p][0])
    problems = [f"{label} {items}" for label, items in
                (("missing params", missing), ("unexpected params", unexpected), ("shape mismatch", shapes)) if items]
    if problems:
        raise CheckpointError(f"{_params_dir(path)} does not match the model in {GLM_CONFIG_FILE}: " + "; ".join(problems))


def restore_params(
    path: str, shapes: Any, dtype: str, shardings: Any | None = None, *, to_host: bool = False
) -> Any:
    """Restores the params of a converted checkpoint for the model whose abstract leaves are `shapes`.

    Float leaves come out in `dtype`, int8 (quantized) leaves as stored. By default they are
    jax.Arrays placed by `shardings` (a matching tree; None: the default device), each host reading
    only its shards; `to_host=True` gives NumPy arrays instead. Shapes are checked first.
    """
    specs = leaf_specs(shapes)
    check_leaves(path, {leaf: spec.shape for leaf, spec in specs.items()})
    flat_shardings = jax.tree.leaves(shardings) if shardings is not None else [None] * len(specs)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    args: dict = {}
    for (leaf, spec), sharding in zip(specs.items(), flat_shardings):
        target = np.dtype(dtype) if np.issubdtype(spec.dtype, np.floating) else spec.dtype
        node = args
        for name in leaf[:-1]:
            node = node.setdefault(name, {})
        node[leaf[-1]] = (ocp.RestoreArgs(restore_type=np.ndarray, dtype=target) if to_host else
                          ocp.ArrayRestoreArgs(sharding=sharding or default, dtype=target, global_shape=spec.shape))
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            return checkpointer.restore(_params_dir(path), args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # orbax raises many types for a damaged checkpoint; name it once.
        raise CheckpointError(f"cannot restore {_params_dir(path)}: {type(e).__name__}: {e}") from e


class ParamReader:
    """Reads slices of stored leaves (one layer, a block of rows) without restoring whole leaves.

    Leaves stored as raw zarr chunks (what `ParamWriter` writes: zarr v2, no compressor, C order)
    are read chunk file by chunk file with direct I/O; any other orbax layout (OCDBT, zarr3,
    compressed) goes through tensorstore.
    """

    def __init__(self, path: str):
        self.leaves = stored_leaves(path)
        params_dir = os.path.abspath(_params_dir(path))
        with open(os.path.join(params_dir, "_METADATA"), encoding="utf-8") as f:
            layout = json.load(f)
        driver = "zarr3" if layout.get("use_zarr3") else "zarr"
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._raw: dict[Path, tuple[str, tuple[int, ...]]] = {}
        opens = {}
        for leaf in self.leaves:
            name = ".".join(leaf)
            if layout.get("use_ocdbt"):
                kvstore = {"driver": "ocdbt", "base": f"file://{params_dir}", "path": name}
            else:
                kvstore = {"driver": "file", "path": os.path.join(params_dir, name)}
                chunks = _raw_chunks(os.path.join(params_dir, name), driver, self.leaves[leaf])
                if chunks is not None:
                    self._raw[leaf] = (os.path.join(params_dir, name), chunks)
            opens[leaf] = ts.open({"driver": driver, "kvstore": kvstore}, open=True, context=context)
        self._stores = {leaf: future.result() for leaf, future in opens.items()}

    def read(self, leaf: Path, layer: int | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
        """`leaf[layer][rows[0]:rows[1]]` (either index optional) as a NumPy array."""
        shape, dtype = self.leaves[leaf]
        box = [(0, n) for n in shape]
        axis = 0
        if layer is not None:
            box[0], axis = (layer, layer + 1), 1
        if rows is not None:
            box[axis] = rows
        out = self._read_raw(leaf, box, dtype) if leaf in self._raw else None
        if out is None:
            store = self._stores[leaf][tuple(slice(a, b) for a, b in box)]
            out = store.read().result()
        return out[0] if layer is not None else out

    def _read_raw(self, leaf: Path, box: list[tuple[int, int]], dtype: np.dtype) -> np.ndarray | None:
        directory, chunk = self._raw[leaf]
        ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, chunk)]
        cells = list(itertools.product(*ranges))
        out = None
        for cell in cells:
            path = os.path.join(directory, ".".join(map(str, cell)) or "0")
            if not os.path.isfile(path):
                return None  # an unwritten chunk means the fill value: leave it to tensorstore
            data = read_file_range(path, 0, math.prod(chunk) * dtype.itemsize)
            values = data.view(dtype).reshape(chunk)
            origin = [i * c for i, c in zip(cell, chunk)]
            inner = tuple(slice(max(a, o) - o, min(b, o + c) - o) for (a, b), o, c in zip(box, origin, chunk))
            if len(cells) == 1 and all(s.stop - s.start == c for s, c in zip(inner, chunk)):
                return values  # the request is exactly one chunk: no copy
            if out is None:
                out = np.empty([b - a for a, b in box], dtype)
            target = tuple(slice(max(a, o) - a, min(b, o + c) - a) for (a, b), o, c in zip(box, origin, chunk))
            out[target] = values[inner]
        return out


def _raw_chunks(directory: str, driver: str, leaf: tuple[tuple[int, ...], np.dtype]) -> tuple[int, ...] | None:
    """The chunk shape of a zarr v2 array whose chunk files are plain C-order bytes, else None."""
    try:
        with open(os.path.join(directory, ".zarray"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    shape, _ = leaf
    plain = (driver == "zarr" and meta.get("compressor") is None and not meta.get("filters")
             and meta.get("order", "C") == "C" and meta.get("dimension_separator", ".") == "."
             and tuple(meta.get("shape", ())) == tuple(shape) and not str(meta.get("dtype", "")).startswith(">"))
    return tuple(meta["chunks"]) if plain and meta.get("chunks") else None


__all__ = [
    "AUX_FILE_PATTERNS", "GLM_CONFIG_FILE", "PARAMS_DIR", "LeafSpec", "ParamReader", "ParamWriter", "aux_files",
    "check_leaves", "copy_aux_files", "is_converted_checkpoint", "leaf_specs", "read_glm_config", "restore_params",
    "stored_leaves", "write_glm_config",
]
