"""Helpers for the golden parity tests: a plain greedy loop of full forward passes (no cache).

It is the simplest possible decoder, so the golden tokens check the model itself, independent of
the cached generation code that has its own tests against this model. The sequence lives in a
fixed-length buffer (one compilation): tokens after the current step cannot influence it, because
everything from `<sop>` on is causal.
"""

from __future__ import annotations

import jax
import numpy as np


def greedy_without_cache(model, params, input_ids, steps, padding_mask=None, filler=None):
    """Appends `steps` argmax tokens; returns (sequences [B, L+steps], scores [steps, B, V])."""
    ids = np.asarray(input_ids)
    batch, length = ids.shape
    filler = model.config.pad_token_id if filler is None else filler
    buffer = np.concatenate([ids, np.full((batch, steps), filler, ids.dtype)], axis=1)
    mask = None
    if padding_mask is not None:
        mask = np.concatenate([np.asarray(padding_mask), np.ones((batch, steps), np.int32)], axis=1)
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens, attention_mask=mask))
    scores = []
    for step in range(steps):
        logits = np.asarray(forward(buffer))[:, length + step - 1]
        scores.append(logits)
        buffer[:, length + step] = logits.argmax(-1)
    return buffer, np.stack(scores)
