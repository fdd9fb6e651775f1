"""The pre-training job: config -> model, mesh, data, state -> steps, metrics, checkpoints.

`default_config()` is the schema of a pre-training config with its defaults; files under
`configs/pretrain/` start from it and change what they need. `train(config, workdir)` runs (or
resumes) a job; everything it produces lives in `workdir`:

    config.json        the resolved config (after command-line overrides)
    model_config.json  the GLMConfig actually trained (vocabulary and special ids resolved)
    tokenizer.model    the SentencePiece model, when the job trained one from its corpus
    checkpoints/       orbax steps: train state + data-loader state
    metrics.jsonl      one record per logged step; tensorboard/ holds the same as event files
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glm_jax.config import GLMConfig, preset
from glm_jax.data.blank_infilling import BlankInfillingConfig, SpecialIds
from glm_jax.data.sources import (
    BlankInfillingLoader, ExampleMaker, LoaderState, TextCorpus, TokenCorpus, find_text_files, index_documents,
    read_document, sentence_end_table,
)
from glm_jax.modeling.transformer import GLMForCausalLM
from glm_jax.sharding import make_mesh
from glm_jax.training.checkpoint import Checkpointer
from glm_jax.training.metrics import (
    MetricWriter, measure_peak_flops, process_peak_flops, train_flops_per_token,
)
from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
from glm_jax.training.state import abstract_state, count_params, create_state, state_shardings
from glm_jax.training.train_step import StepConfig, global_batch, make_train_step

TOKENIZER_FILE = "tokenizer.model"


def default_config() -> ml_collections.ConfigDict:
    """Every knob of a pre-training job, with defaults (a tiny model on synthetic data)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 100
    c.batch_size = 8  # global rows per step (all hosts, all micro-batches)
    c.seq_len = 128

    c.model = ml_collections.ConfigDict()
    c.model.preset = "chatglm-tiny"
    # GLMConfig fields to replace, e.g. {"num_layers": 4, "dtype": "bfloat16", "remat_policy": "dots"}.
    c.model.overrides = ml_collections.ConfigDict()
    # With a tokenizer: vocabulary size (rounded up to this multiple) and special ids come from it.
    c.model.vocab_multiple = 128

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # "text": files under `path`; "synthetic": generated token documents
    c.data.path = ""  # a .txt/.md/.jsonl/.json file or a directory of them
    c.data.split = "paragraph"  # text files: one document per "file", "paragraph" or "line"
    c.data.jsonl_key = "text"
    c.data.join_lines = False  # text of hard-wrapped corpora: line breaks inside a document -> spaces
    c.data.tokenizer = ""  # a ChatGLM SentencePiece model (file or directory with ice_text.model)
    c.data.tokenizer_vocab_size = 0  # >0 and no tokenizer: train one on the corpus into the workdir
    c.data.num_workers = 0  # tokenizing / transforming worker processes
    c.data.prefetch = 4
    c.data.shuffle = True
    c.data.min_tokens = 8
    c.data.synthetic_documents = 2000

    c.objective = ml_collections.ConfigDict(dataclasses.asdict(BlankInfillingConfig()))
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig()))
    c.optimizer.decay_steps = -1  # -1: decay over the whole run (`steps`)
    c.step = ml_collections.ConfigDict(dataclasses.asdict(StepConfig()))

    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.peak_flops_per_device = 0.0  # 0: measured at start-up with a matmul (for MFU)
    return c


@dataclasses.dataclass
class Job:
    """Everything built from a config, before the first step."""

    model_config: GLMConfig
    ids: SpecialIds
    corpus: Any
    maker: ExampleMaker


def special_ids_of_model(config: GLMConfig) -> SpecialIds:
    """Special ids when no tokenizer is given: the ChatGLM layout ([MASK] … <dBLOCK> consecutive)."""
    return SpecialIds(
        mask=config.mask_token_id, gmask=config.gmask_token_id, smask=config.gmask_token_id + 1,
        sop=config.bos_token_id, eop=config.eos_token_id, pad=config.pad_token_id, dblock=config.mask_token_id + 7,
    )


def synthetic_documents(count: int, low: int, high: int, seed: int) -> list[np.ndarray]:
    """Token documents made of recurring phrases (learnable, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(low, high, size=int(rng.integers(3, 9))) for _ in range(256)]
    return [np.concatenate([phrases[i] for i in rng.zipf(1.3, size=int(rng.integers(4, 40))) % 256])
            for _ in range(count)]


def _tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    if config.data.tokenizer:
        return config.data.tokenizer
    path = os.path.join(workdir, TOKENIZER_FILE)
    if config.data.tokenizer_vocab_size <= 0:
        raise ValueError("data.kind='text' needs data.tokenizer (a SentencePiece model) or data.tokenizer_vocab_size > 0")
    if not os.path.isfile(path):
        if jax.process_index() == 0:
            from glm_jax.tokenizer import train_chatglm_sentencepiece

            refs = index_documents(find_text_files(config.data.path), config.data.split)
            texts = [read_document(r, config.data.jsonl_key, config.data.join_lines) for r in refs]
            _say(f"training a {config.data.tokenizer_vocab_size}-piece SentencePiece model on {len(texts)} documents")
            train_chatglm_sentencepiece(texts, config.data.tokenizer_vocab_size, path)
        _sync("tokenizer")
    return path


def build_job(config: ml_collections.ConfigDict, workdir: str) -> Job:
    """Resolves the model config, the special ids and the corpus of `config`."""
    overrides = dict(config.model.overrides)
    model_config = preset(config.model.preset).replace(**overrides)
    is_sentence_end = None
    if config.data.kind == "text":
        from glm_jax.tokenizer import ChatGLMTokenizer

        tokenizer_path = _tokenizer_path(config, workdir)
        tokenizer = ChatGLMTokenizer.from_pretrained(tokenizer_path)
        ids = SpecialIds.from_tokenizer(tokenizer)
        multiple = config.model.vocab_multiple
        vocab = max(model_config.vocab_size if "vocab_size" in overrides else 0,
                    multiple * math.ceil(tokenizer.vocab_size / multiple))
        model_config = model_config.replace(
            vocab_size=vocab, bos_token_id=ids.sop, eos_token_id=ids.eop, mask_token_id=ids.mask,
            gmask_token_id=ids.gmask, pad_token_id=ids.pad)
        corpus = TextCorpus(config.data.path, tokenizer.model_file, config.data.split, config.data.jsonl_key,
                            config.data.join_lines)
        is_sentence_end = sentence_end_table(tokenizer)
    elif config.data.kind == "synthetic":
        ids = special_ids_of_model(model_config)
        corpus = TokenCorpus(synthetic_documents(config.data.synthetic_documents, 10, ids.mask, config.seed))
    else:
        raise ValueError(f"unknown data.kind {config.data.kind!r}; expected 'text' or 'synthetic'")
    objective = BlankInfillingConfig(**dict(config.objective))
    maker = ExampleMaker(objective, ids, config.seq_len, config.seed, is_sentence_end, config.data.min_tokens)
    return Job(model_config, ids, corpus, maker)


def _say(message: str) -> None:
    """Progress for the person running the job (stdout of the primary process)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        _say("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """Whether any process got SIGTERM; all processes must stop at the same step, so with several
        processes the flag is gathered every step (a tiny collective)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _window_means(sums: dict[str, Any], last: dict[str, Any], steps: int) -> dict[str, float]:
    """Logged values of a window of steps: means of loss, accuracy and gradient norm, totals of scored
    tokens and skipped steps, the latest learning rate."""
    values = {k: float(v) / steps for k, v in sums.items()}
    values.update(scored_tokens=float(sums["scored_tokens"]), skipped=float(sums["skipped"]),
                  learning_rate=float(last["learning_rate"]))
    return values


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the job described by `config` in `workdir`, resuming from its newest readable checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    job = build_job(config, workdir)
    if primary:
        _write_json(os.path.join(workdir, "model_config.json"), job.model_config.to_dict())

    mesh = make_mesh(**dict(config.mesh))
    model = GLMForCausalLM(job.model_config)
    optimizer_values = dict(config.optimizer)
    if optimizer_values["decay_steps"] < 0:
        optimizer_values["decay_steps"] = max(config.steps, optimizer_values["warmup_steps"])
    tx, schedule = make_optimizer(OptimizerConfig(**optimizer_values))
    shardings = state_shardings(model, tx, config.seq_len, mesh)
    step_fn = make_train_step(model, tx, schedule, StepConfig(**dict(config.step)), mesh, shardings)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                async_save=config.async_checkpoint)
    restored = checkpointer.restore_latest(abstract_state(model, tx, config.seq_len, mesh))
    if restored is None:
        state, loader_state, start = create_state(model, tx, config.seq_len, mesh, config.seed), LoaderState(), 0
    else:
        start, state, data_state = restored
        loader_state = LoaderState.from_dict(data_state["loader"])
        _say(f"resumed from step {start} ({checkpointer.directory})")
    _say(f"model {config.model.preset}: {count_params(state.params) / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
         f"{jax.process_count()} process(es)")

    flops_per_token = train_flops_per_token(job.model_config, config.seq_len)
    peak = process_peak_flops(config.peak_flops_per_device or measure_peak_flops(job.model_config.dtype))
    writer = MetricWriter(workdir, enabled=primary)
    loader = BlankInfillingLoader(
        job.corpus, job.maker, batch_size=config.batch_size, shuffle=config.data.shuffle,
        num_workers=config.data.num_workers, prefetch=config.data.prefetch, state=loader_state,
        process_index=jax.process_index(), process_count=jax.process_count())
    preemption = _Preemption()
    step, last, window_start, window_tokens, window_steps = start, None, time.perf_counter(), 0, 0
    window = None  # on-device sums of the metrics since the last log line (no host sync per step)
    try:
        while step < config.steps and not preemption.agreed():
            batch = next(loader)
            state, metrics = step_fn(state, global_batch(batch, mesh))
            window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
            step += 1
            window_tokens += int(np.count_nonzero(batch["segment_ids"])) * jax.process_count()
            window_steps += 1
            if step % config.log_every == 0 or step == config.steps:
                values = _window_means(jax.device_get(window), jax.device_get(metrics), window_steps)
                window = None
                elapsed = time.perf_counter() - window_start
                values["tokens_per_s"] = window_tokens / elapsed
                values["mfu"] = flops_per_token * config.batch_size * config.seq_len * window_steps / elapsed / peak
                writer.write(step, values)
                last = values
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpointer.save(step, state, {"loader": loader.state.to_dict()}, force=True)
        if step < config.steps and step not in checkpointer.steps():  # stopped early by SIGTERM
            checkpointer.save(step, state, {"loader": loader.state.to_dict()}, force=True)
        checkpointer.wait()
    finally:
        preemption.restore()
        loader.close()
        writer.close()
        checkpointer.close()
    return {"step": step, "last_metrics": last, "preempted": step < config.steps, "state": state,
            "model_config": job.model_config}
