"""All-or-nothing output directories for the converters.

Everything is written into a hidden temporary sibling of the destination, which is renamed onto
the destination only once complete. A failed or interrupted run therefore never leaves a half
checkpoint under the destination name (at worst a `.NAME.tmp-*` directory after a hard kill), and
an existing destination is replaced only with `overwrite=True`, after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Iterator

import jax


class ConversionError(Exception):
    """A conversion that cannot be done as asked; the message names the file, key or flag."""


def _shared_token() -> str:
    """A random name part, the same on every host of a multi-host run."""
    token = uuid.uuid4().int % 10**12
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = int(multihost_utils.broadcast_one_to_all(token))
    return f"{token:012d}"


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or anything in its cause chain) is an out-of-space failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def output_directory(dst: str, *, overwrite: bool = False, sources: tuple[str, ...] = ()) -> Iterator[str]:
    """Yields an empty temporary directory that becomes `dst` when the block finishes without error."""
    dst = os.path.abspath(dst)
    for src in sources:
        if os.path.abspath(src) == dst:
            raise ConversionError(f"the destination is the source directory: {dst}")
    if os.path.lexists(dst) and not overwrite:
        raise ConversionError(f"destination already exists: {dst} (pass --overwrite to replace it)")
    parent, name = os.path.split(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the destination's parent directory {parent}: {e}") from e
    token = _shared_token()
    staging = os.path.join(parent, f".{name}.tmp-{token}")
    primary = jax.process_index() == 0
    try:
        if primary:
            os.mkdir(staging)
        yield staging
        if primary:
            if os.path.lexists(dst):
                old = os.path.join(parent, f".{name}.old-{token}")
                os.rename(dst, old)
                os.rename(staging, dst)
                _remove(old)
            else:
                os.rename(staging, dst)
    except BaseException as e:
        if primary:
            _remove(staging)
        if is_disk_full(e):
            raise ConversionError(f"disk full while writing {dst} (nothing was written there): {e}") from e
        raise
