"""Prefill + decode with a preallocated KV cache; the token loop runs on the device.

One compiled program does everything for `generate`: it left-pads the prompts into a bucket of
length `P`, runs the prompt through the model with `decode=True` (which writes keys/values into a
cache of `P + N - 1` slots for `N` new tokens), then runs a `lax.while_loop` that feeds one token per step until every row
has stopped or `max_new_tokens` is reached. The host sees only the finished token buffer. Streaming
(`stream_generate`) reuses the same pieces as two programs (prefill, then "decode until step s") so
that the host can read tokens between steps.

The model is the training model (`GLMForCausalLM` with `decode=True`); nothing here re-implements a
layer. Positions follow spec §1.5.3 through `glm_jax.positions` (`positions_and_mask` for the
prompt, `next_position_ids` for each new token), so the rule depends on `config.position_scheme`.

Ragged batches: rows are left-padded so all share one cache index; pads get position 0 and are
masked as keys (the official tokenizer's padding), so a row's tokens equal those of the same
prompt run alone. Prompt lengths are bucketed (powers of two by default) and the new-token budget
is rounded up to a power of two, so new lengths reuse compiled programs; the actual limits are
traced values.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from glm_jax.config import GLMConfig
from glm_jax.modeling.layer_stack import model_for_params
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.positions import next_position_ids, positions_and_mask
from glm_jax.sampling import SamplingParams, SamplingPlan, SamplingValues, choose_tokens

Array = jnp.ndarray

MIN_BUCKET = 16


# ------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Everything that fixes the shapes of a compiled decode program (hashable, static)."""

    model: GLMForCausalLM
    batch: int
    prompt_len: int  # P: bucketed prompt length (left padding inside)
    max_new: int  # N: output buffer length (bucketed); the traced limit may be smaller
    sampling: SamplingPlan
    stop_ids: tuple[int, ...]
    pad_id: int
    keep_logits: bool = False  # also return the logits each token was chosen from

    @property
    def cache_len(self) -> int:
        """Cache slots: the prompt plus every generated token but the last, which is never fed."""
        return self.prompt_len + self.max_new - 1


class DecodeState(NamedTuple):
    """The loop carry. `logits` are the scores the token at `step` is chosen from."""

    cache: Any
    logits: Array  # [B, V] float32
    positions: Array  # [B, R] positions of the last token fed
    prompt_valid: Array  # [B, P] bool, False on left padding
    tokens: Array  # [B, N] int32, pad where nothing was chosen (yet)
    step: Array  # int32 scalar: tokens chosen so far
    done: Array  # [B] bool: row has produced a stop token
    seen: Array | None  # [B, V] bool: prompt + output tokens, for the repetition penalty
    rng: Array
    kept_logits: Array | None  # [B, N, V] float32 when the plan keeps logits


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """Smallest bucket >= n: from `buckets` if given, else the next power of two (at least 16)."""
    if buckets:
        fitting = [b for b in sorted(buckets) if b >= n]
        if not fitting:
            raise ValueError(f"no prompt bucket holds {n} tokens (buckets: {sorted(buckets)})")
        return fitting[0]
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


# ---------------------------------------------------------------------------- device functions


@functools.lru_cache(maxsize=64)
def _cache_shapes(model: GLMForCausalLM, batch: int, cache_len: int) -> Any:
    """Abstract cache of the model for `[batch, cache_len]` (traced once, never materialised)."""
    cfg = model.config
    ids = jnp.zeros((batch, cache_len), jnp.int32)
    positions = jnp.zeros((batch, cfg.num_position_rows, cache_len), jnp.int32)
    mask = jnp.ones((batch, 1, cache_len, cache_len), bool)
    variables = jax.eval_shape(
        functools.partial(model.init, decode=True), jax.random.key(0), ids, positions, mask
    )
    return variables["cache"]


def _apply(plan: DecodePlan, params: Any, cache: Any, ids: Array, positions: Array, mask: Array):
    logits, variables = plan.model.apply(
        {"params": params, "cache": cache}, ids, positions, mask, decode=True, mutable=["cache"]
    )
    return logits, variables["cache"]


def _choose(plan: DecodePlan, state: DecodeState, values: SamplingValues) -> DecodeState:
    """Chooses the token at `state.step` for every row; finished rows get padding."""
    rng = jax.random.fold_in(state.rng, state.step)
    token = choose_tokens(state.logits, rng, plan.sampling, values, state.seen)
    token = jnp.where(state.done, plan.pad_id, token)
    tokens = lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    done = state.done | jnp.isin(token, jnp.asarray(plan.stop_ids, jnp.int32))
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(plan.batch), token].set(True)
    kept = state.kept_logits
    if kept is not None:
        kept = lax.dynamic_update_slice(kept, state.logits[:, None], (0, state.step, 0))
    return state._replace(tokens=tokens, step=state.step + 1, done=done, seen=seen, kept_logits=kept)


def _prefill(
    plan: DecodePlan, params: Any, ids: Array, valid: Array, values: SamplingValues, rng: Array
) -> DecodeState:
    """Runs the padded prompts `[B, P]` into a fresh cache and chooses the first new token."""
    cfg = plan.model.config
    positions, mask = positions_and_mask(cfg, ids, valid)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, plan.cache_len - plan.prompt_len)))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(plan.model, plan.batch, plan.cache_len))
    logits, cache = _apply(plan, params, cache, ids, positions, mask)
    seen = None
    if plan.sampling.penalty:
        seen = jnp.zeros((plan.batch, cfg.vocab_size), bool).at[jnp.arange(plan.batch)[:, None], ids].max(valid)
    state = DecodeState(
        cache=cache, logits=logits[:, -1].astype(jnp.float32), positions=positions[:, :, -1],
        prompt_valid=valid, tokens=jnp.full((plan.batch, plan.max_new), plan.pad_id, jnp.int32),
        step=jnp.int32(0), done=jnp.zeros((plan.batch,), bool), seen=seen, rng=rng,
        kept_logits=jnp.zeros((plan.batch, plan.max_new, cfg.vocab_size), jnp.float32) if plan.keep_logits else None,
    )
    return _choose(plan, state, values)


def _feed_last_token(plan: DecodePlan, params: Any, state: DecodeState) -> DecodeState:
    """Feeds the last chosen token (one per row) through the model, updating cache and logits."""
    cfg = plan.model.config
    token = lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)
    fed = jnp.sum(state.prompt_valid, axis=1) + state.step - 2  # index of the last token fed, among real ones
    positions = next_position_ids(cfg, state.positions, fed)
    slot = plan.prompt_len + state.step - 1  # cache slot this token is written to
    generated = jnp.arange(plan.cache_len - plan.prompt_len) + plan.prompt_len <= slot
    keys = jnp.concatenate([state.prompt_valid, jnp.broadcast_to(generated, (plan.batch, generated.shape[0]))], axis=1)
    logits, cache = _apply(plan, params, state.cache, token, positions[:, :, None], keys[:, None, None, :])
    return state._replace(cache=cache, logits=logits[:, 0].astype(jnp.float32), positions=positions)


def _decode_until(
    plan: DecodePlan, params: Any, state: DecodeState, values: SamplingValues, limit: Array
) -> DecodeState:
    """`lax.while_loop` over decode steps until `limit` tokens are chosen or every row stopped."""

    def running(s: DecodeState) -> Array:
        return (s.step < limit) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        return _choose(plan, _feed_last_token(plan, params, s), values)

    return lax.while_loop(running, step, state)


def _generate_program(
    plan: DecodePlan, params: Any, ids: Array, valid: Array, values: SamplingValues, rng: Array, limit: Array
) -> tuple[Array, Array, Array | None]:
    """The whole generation as one program: (tokens [B, N], tokens chosen, kept logits or None)."""
    state = _decode_until(plan, params, _prefill(plan, params, ids, valid, values, rng), values, limit)
    return state.tokens, state.step, state.kept_logits


_JITTED = {
    "generate": jax.jit(_generate_program, static_argnums=0),
    "prefill": jax.jit(_prefill, static_argnums=0),
    "decode_until": jax.jit(_decode_until, static_argnums=0, donate_argnums=2),
}


# ---------------------------------------------------------------------------------- compilation


class _ProgramCache:
    """Compiled programs keyed by plan and argument signature; records compile seconds."""

    def __init__(self) -> None:
        self._programs: dict[Any, Any] = {}
        self.compile_seconds = 0.0  # total so far, for reports

    @staticmethod
    def _signature(args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        return treedef, tuple(
            (np.shape(x), str(x.dtype), getattr(x, "sharding", None)) for x in leaves
        )

    def get(self, name: str, plan: DecodePlan, args: tuple) -> tuple[Any, float]:
        key = (name, plan, self._signature(args))
        if key in self._programs:
            return self._programs[key], 0.0
        start = time.perf_counter()
        compiled = _JITTED[name].lower(plan, *args).compile()
        seconds = time.perf_counter() - start
        self._programs[key] = compiled
        self.compile_seconds += seconds
        return compiled, seconds

    def compiled(self, name: str) -> list[tuple[DecodePlan, Any]]:
        """(plan, program) of each program of `name` compiled so far: their optimized HLO shows what XLA
        made of a plan."""
        return [(plan, program) for (kind, plan, _), program in self._programs.items() if kind == name]


PROGRAMS = _ProgramCache()


# ------------------------------------------------------------------------------- host-side API


@dataclasses.dataclass
class GenerationOutput:
    """New tokens per prompt (each ends with its stop token if one was produced) and timings."""

    sequences: list[list[int]]
    logits: list[np.ndarray] | None  # per prompt [new tokens, V]: the logits each was chosen from
    compile_seconds: float  # 0.0 when a compiled program was reused
    run_seconds: float  # device run incl. transfers, excluding compilation
    prompt_bucket: int
    new_token_bucket: int


@dataclasses.dataclass(frozen=True)
class _Request:
    plan: DecodePlan
    ids: np.ndarray  # [B, P] int32, left-padded
    valid: np.ndarray  # [B, P] bool
    limit: int  # new tokens to produce at most
    values: SamplingValues
    rng: Array


def _check_prompts(config: GLMConfig, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise ValueError("prompts must be a list of token-id lists (encode text with the tokenizer first)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or np.ndim(prompt) != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got {type(prompt).__name__}")
        ids = np.asarray(prompt)
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} holds non-integer token ids (dtype {ids.dtype})")
        bad = ids[(ids < 0) | (ids >= config.vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary [0, {config.vocab_size})")
        if ids.size >= config.max_sequence_length:
            raise ValueError(
                f"prompt {i} has {ids.size} tokens; the context holds {config.max_sequence_length} "
                "(max_sequence_length) including at least one new token"
            )
        if config.position_scheme == "glm_2d":
            if config.bos_token_id not in ids:
                raise ValueError(f"prompt {i} has no <sop> (id {config.bos_token_id}): GLM prompts end with [gMASK] <sop>")
            if config.gmask_token_id not in ids and config.mask_token_id not in ids:
                raise ValueError(
                    f"prompt {i} has neither [gMASK] (id {config.gmask_token_id}) nor [MASK] "
                    f"(id {config.mask_token_id}): the generated block needs a mask position"
                )
        if config.position_scheme == "glm130b" and config.bos_token_id not in ids:
            raise ValueError(f"prompt {i} has no <sop> (id {config.bos_token_id}): GLM-130B prompts end with <sop>")
        checked.append([int(t) for t in ids])
    return checked


def _new_token_limit(config: GLMConfig, longest: int, max_new_tokens: int | None, max_length: int | None) -> int:
    """New tokens allowed: the tighter of `max_new_tokens`, `max_length` (prompt + new, counted on
    the longest prompt) and the context window (never exceeded)."""
    if max_new_tokens is None and max_length is None:
        raise ValueError("give max_new_tokens or max_length")
    limits = [config.max_sequence_length - longest]
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        limits.append(int(max_new_tokens))
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= longest:
            raise ValueError(f"max_length={max_length!r} leaves no room for new tokens after a {longest}-token prompt")
        limits.append(int(max_length) - longest)
    return min(limits)


def _request(
    model: GLMForCausalLM, params: Any, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
    max_new_tokens: int | None, max_length: int | None, seed: int,
    stop_ids: Sequence[int] | None, prompt_buckets: Sequence[int] | None, keep_logits: bool = False,
) -> _Request:
    model = model_for_params(model, params)
    config = model.config
    batch = _check_prompts(config, prompts)
    longest = max(len(p) for p in batch)
    limit = _new_token_limit(config, longest, max_new_tokens, max_length)
    if stop_ids is None:
        stop_ids = () if config.eos_token_id is None else (config.eos_token_id,)
    pad_id = config.pad_token_id or 0
    prompt_len = bucket_length(longest, prompt_buckets)
    ids = np.full((len(batch), prompt_len), pad_id, np.int32)
    valid = np.zeros((len(batch), prompt_len), bool)
    for row, prompt in enumerate(batch):
        ids[row, prompt_len - len(prompt):] = prompt
        valid[row, prompt_len - len(prompt):] = True
    plan = DecodePlan(
        model=model, batch=len(batch), prompt_len=prompt_len, max_new=bucket_length(limit),
        sampling=sampling.plan(config.vocab_size), stop_ids=tuple(int(s) for s in stop_ids), pad_id=pad_id,
        keep_logits=keep_logits,
    )
    return _Request(plan, ids, valid, limit, sampling.values(), jax.random.key(seed))


def _trim(row: np.ndarray, count: int, stop_ids: tuple[int, ...]) -> list[int]:
    """The first `count` tokens, cut after the first stop token."""
    tokens = [int(t) for t in row[:count]]
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def generate_with_stats(
    model: GLMForCausalLM,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    prompt_buckets: Sequence[int] | None = None,
    keep_logits: bool = False,
) -> GenerationOutput:
    """`generate` that also reports compile and run seconds and the buckets used; with
    `keep_logits`, also the raw logits each new token was chosen from (before sampling settings)."""
    sampling = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
    req = _request(model, params, prompts, sampling, max_new_tokens=max_new_tokens, max_length=max_length, seed=seed,
                   stop_ids=stop_ids, prompt_buckets=prompt_buckets, keep_logits=keep_logits)
    params = nn.unbox(params)
    args = (params, req.ids, req.valid, req.values, req.rng, np.int32(req.limit))
    program, compile_seconds = PROGRAMS.get("generate", req.plan, args)
    start = time.perf_counter()
    tokens, count, kept = jax.device_get(program(*args))
    run_seconds = time.perf_counter() - start
    sequences = [_trim(row, int(count), req.plan.stop_ids) for row in tokens]
    logits = None if kept is None else [k[: len(seq)] for k, seq in zip(kept, sequences)]
    return GenerationOutput(sequences, logits, compile_seconds, run_seconds, req.plan.prompt_len, req.plan.max_new)


def generate(
    model: GLMForCausalLM,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    prompt_buckets: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token-id lists, ragged; padding is handled inside).

    Generation stops at a stop token (default: the config's eos, which is kept at the end of the
    returned tokens), after `max_new_tokens`, when prompt + new tokens reach `max_length`, or at the
    context window (`max_sequence_length`), whichever comes first. Sampling settings follow
    Hugging Face `generate` (see `glm_jax.sampling`); `do_sample=False` or `temperature=0` is
    greedy. `seed` makes sampling reproducible. `prompt_buckets` replaces the power-of-two prompt
    length buckets. GLM 2D prompts must hold `[gMASK]` or `[MASK]` and `<sop>` (the tokenizer's
    `encode` appends `[gMASK] <sop>`).
    """
    return generate_with_stats(
        model, params, prompts, max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
        stop_ids=stop_ids, prompt_buckets=prompt_buckets,
    ).sequences


def stream_generate(
    model: GLMForCausalLM,
    params: Any,
    prompt: Sequence[int],
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    prompt_buckets: Sequence[int] | None = None,
    tokens_per_yield: int = 1,
) -> Iterator[list[int]]:
    """Like `generate` for one prompt, yielding the new token ids as they are produced.

    The device runs `tokens_per_yield` steps between host reads (1 = every token). The yielded
    lists concatenate to exactly what `generate` returns with the same settings.
    """
    if isinstance(tokens_per_yield, bool) or not isinstance(tokens_per_yield, int) or tokens_per_yield < 1:
        raise ValueError(f"tokens_per_yield must be an integer >= 1, got {tokens_per_yield!r}")
    sampling = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
    req = _request(model, params, [prompt], sampling, max_new_tokens=max_new_tokens, max_length=max_length, seed=seed,
                   stop_ids=stop_ids, prompt_buckets=prompt_buckets)
    params = nn.unbox(params)
    prefill_args = (params, req.ids, req.valid, req.values, req.rng)
    prefill, _ = PROGRAMS.get("prefill", req.plan, prefill_args)
    state = prefill(*prefill_args)
    emitted = 0
    while True:
        count, finished, tokens = jax.device_get((state.step, state.done[0], state.tokens[0]))
        new = _trim(tokens[emitted:], int(count) - emitted, req.plan.stop_ids)
        emitted = int(count)
        if new:
            yield new
        if finished or emitted >= req.limit:
            return
        args = (params, state, req.values, np.int32(min(emitted + tokens_per_yield, req.limit)))
        decode, _ = PROGRAMS.get("decode_until", req.plan, args)
        state = decode(*args)


# ------------------------------------------------------------------------------ blank infilling


def fill_blanks(model: GLMForCausalLM, params: Any, prompt: Sequence[int], **settings: Any) -> list[int]:
    """Fills every `[MASK]` of `prompt` (token ids, no `[gMASK]`, no `<sop>`) left to right.

    Each round appends `<sop>`, generates the span of the first remaining `[MASK]` (the official
    mask position rule targets the first one) and splices it in place of that `[MASK]`, so later
    blanks see the earlier ones filled. Stop tokens and mask tokens are dropped from the spans.
    `settings` are `generate`'s keyword arguments (`max_new_tokens` applies per blank).
    """
    return _fill(model, params, prompt, settings)[0]


def _fill(
    model: GLMForCausalLM, params: Any, prompt: Sequence[int], settings: dict[str, Any]
) -> tuple[list[int], list[list[int]]]:
    """(filled ids, the span spliced into each blank)."""
    cfg = model.config
    if cfg.position_scheme != "glm_2d":
        raise ValueError("blank infilling needs a GLM 2D model ([MASK] positions); this config is causal")
    ids = [int(t) for t in prompt]
    if cfg.gmask_token_id in ids or cfg.bos_token_id in ids:
        raise ValueError("fill_blanks prompts hold [MASK] tokens only: no [gMASK] and no <sop>")
    if cfg.mask_token_id not in ids:
        raise ValueError(f"prompt has no [MASK] (id {cfg.mask_token_id}) to fill")
    dropped = {*(settings.get("stop_ids") or (cfg.eos_token_id,)), cfg.mask_token_id, cfg.gmask_token_id}
    spans = []
    for _ in range(ids.count(cfg.mask_token_id)):
        generated = generate(model, params, [ids + [cfg.bos_token_id]], **settings)[0]
        span = [t for t in generated if t not in dropped]
        at = ids.index(cfg.mask_token_id)
        ids = ids[:at] + span + ids[at + 1:]
        spans.append(span)
    return ids, spans


def fill_blanks_text(
    model: GLMForCausalLM, params: Any, tokenizer: Any, text: str, marker: str = "[MASK]", **settings: Any
) -> str:
    """`text` with every `marker` replaced by generated text, left to right.

    The text around the blanks is kept verbatim (each span is decoded on its own and spliced into
    the original string), so tokenization round-trip effects never alter the user's text.
    """
    pieces = text.split(marker)
    if len(pieces) < 2:
        raise ValueError(f"text has no {marker!r} blank to fill")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(model.config.mask_token_id)
        ids += tokenizer.encode(piece, add_special_tokens=False)
    _, spans = _fill(model, params, ids, settings)
    out = [pieces[0]]
    for span, piece in zip(spans, pieces[1:]):
        out += [tokenizer.decode(span), piece]
    return "".join(out)
