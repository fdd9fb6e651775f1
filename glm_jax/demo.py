"""`make demo`: pre-train a small GLM with blank infilling, then measure how well it fills blanks.

    python -m glm_jax.demo [--workdir=DIR] [--config.steps=N ...]

Runs the glm-train job on `configs/pretrain/tiny.py` (definitions from The Devil's Dictionary, public
domain, shipped in `glm_jax/data/corpus/`), reloads the saved checkpoint, compares the final loss with
the corpus' unigram entropy (the loss of a model that knows only token frequencies) and renders the
loss curve. Then it checks that the infills come from the corpus: in `EVAL_DEFINITIONS` definitions
of the training text, spread evenly over it, the longest word is hidden behind `[MASK]` and filled
greedily; the demo prints the first few and reports how often the infill is exactly the hidden word,
how often it starts with it, and how often the infill's words, with the words on either side of the
blank, occur together in the corpus, for the model and for two baselines that know the corpus' word
statistics (the most frequent word; the most frequent word after the word before the blank).
Finally it continues `[gMASK]` prompts made of the first evaluated definitions' headwords.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from glm_jax.host_memory import with_huge_page_heap

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain", "tiny.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Pre-training config of the demo.")
flags.DEFINE_string("workdir", None, "Where the run is written (default: a new temporary directory).")
FLAGS = flags.FLAGS

EVAL_DEFINITIONS = 100
SHOWN_BLANKS = 5
CONTINUED_HEADWORDS = 3
# A dictionary entry: an upper-case headword, a comma, a part of speech ending with a period ("n.", "v.t.").
DEFINITION = re.compile(r"[A-Z][A-Z'-]*(?: [A-Z'-]+)*, [a-z.]+\.")
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
WORD_START = "\u2581"  # SentencePiece's space marker


@dataclasses.dataclass(frozen=True)
class Blank:
    """One definition with its longest word hidden: token ids and the text around the blank."""

    prompt_ids: list[int]  # the definition's tokens with the hidden word's tokens replaced by one [MASK]
    before: str  # text before the hidden word, up to it (spaces included)
    answer: str  # the hidden word
    after: str  # text after it, from right after it

    def shown(self, infill: str = "[MASK]") -> str:
        return self.before + infill + self.after


def unigram_entropy(token_ids: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution: the loss of the best context-free model."""
    counts = np.bincount(token_ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def words(text: str) -> list[str]:
    return WORD.findall(text)


def headword(definition: str) -> str:
    """`"ABDICATION, n."` of a definition: the prompt that asks the model to continue it."""
    match = DEFINITION.match(definition)
    if match is None:
        raise ValueError(f"not a dictionary definition: {definition[:60]!r}")
    return match.group()


def evenly_spaced(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items spread over `items` from the first on (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def longest_word_blank(tokenizer: Any, definition: str, mask_id: int) -> Blank | None:
    """The definition with its longest word (first one on ties) hidden behind one `[MASK]`; None when
    nothing follows the headword (entries whose text is a verse in the next paragraph).

    Blanks are cut in the definition's own tokens, so the prompt is tokenized exactly as in training.
    A candidate word is a run of letter-only pieces whose first piece starts a word (it carries the
    space marker or follows a whitespace piece); it lies after the part of speech, so the headword
    is never hidden.
    """
    ids = tokenizer.encode(definition, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    spaced = [p.startswith(WORD_START) for p in pieces]
    letters = [p[1:].isalpha() if s else p.isalpha() for p, s in zip(pieces, spaced)]
    after_space = [False] + [tokenizer.decode([t]).isspace() for t in ids[:-1]]
    body = next((i + 1 for i, p in enumerate(pieces) if "." in p), len(pieces))
    best = None  # (start, end, characters)
    i = body
    while i < len(pieces):
        if letters[i] and (spaced[i] or after_space[i]):
            j = i + 1
            while j < len(pieces) and letters[j] and not spaced[j]:
                j += 1
            length = len("".join(pieces[i:j])) - spaced[i]
            if best is None or length > best[2]:
                best = (i, j, length)
            i = j
        else:
            i += 1
    if best is None:
        return None
    i, j, _ = best
    return Blank(ids[:i] + [mask_id] + ids[j:], tokenizer.decode(ids[:i]) + " " * spaced[i],
                 tokenizer.decode(ids[i:j]).strip(), " " * (j < len(ids) and spaced[j]) + tokenizer.decode(ids[j:]))


class CorpusWords:
    """Word statistics of the training documents: the baselines' guesses and the in-context check."""

    def __init__(self, documents: Sequence[str]) -> None:
        # The most frequent word of the text a blank may hide: after the part of speech of an entry.
        bodies = [d[m.end():] if (m := DEFINITION.match(d)) else d for d in documents]
        self.most_frequent = collections.Counter(w for d in bodies for w in words(d)).most_common(1)[0][0]
        documents = [words(d) for d in documents]
        following: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for d in documents:
            for prev, word in zip(d, d[1:]):
                following[prev.lower()][word] += 1
        self.most_frequent_after = {prev: c.most_common(1)[0][0] for prev, c in following.items()}
        self.joined = " " + " | ".join(" ".join(d) for d in documents).lower() + " "  # "|" never matches a word

    def bigram_guess(self, blank: Blank) -> str:
        """The word that most often follows the word before the blank (the most frequent word if none)."""
        before = words(blank.before)
        return self.most_frequent_after.get(before[-1].lower(), self.most_frequent) if before else self.most_frequent

    def in_context(self, blank: Blank, infill: str) -> bool:
        """Whether the words of the filled definition that touch the infill, with one word on either
        side, occur in that order in one corpus document (words are cut in the filled text, so an
        infill that completes a word, as in "word" + "'s", is judged as that word)."""
        start, end = len(blank.before), len(blank.before) + len(infill)
        found = list(WORD.finditer(blank.shown(infill)))
        touching = [i for i, m in enumerate(found) if m.end() > start and m.start() < end]
        if not touching:
            return False
        around = found[max(touching[0] - 1, 0):touching[-1] + 2]
        return f" {' '.join(m.group() for m in around).lower()} " in self.joined


def score_infills(blanks: Sequence[Blank], infills: Sequence[str], corpus: CorpusWords) -> dict[str, float]:
    """Rates over the blanks: the infill is exactly the hidden word (spaces stripped); it starts with
    the hidden word (a `[MASK]` does not say how long its span is, so a model may run on past it);
    it fits its context in the corpus (`CorpusWords.in_context`)."""
    pairs = list(zip(blanks, infills, strict=True))
    exact = [infill.strip() == blank.answer for blank, infill in pairs]
    starts = [re.match(re.escape(blank.answer) + r"(?![A-Za-z])", infill.strip()) is not None
              for blank, infill in pairs]
    context = [corpus.in_context(blank, infill) for blank, infill in pairs]
    return {"exact": float(np.mean(exact)), "starts": float(np.mean(starts)), "in_context": float(np.mean(context))}


def fill_blanks_batch(model: Any, params: Any, tokenizer: Any, blanks: Sequence[Blank], max_new_tokens: int = 8
                      ) -> list[str]:
    """Greedy infill of every blank in one batched `generate` call (each prompt holds one `[MASK]`)."""
    from glm_jax.generation import generate

    prompts = [b.prompt_ids + [model.config.bos_token_id] for b in blanks]
    spans = generate(model, params, prompts, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(span).strip() for span in spans]  # <eop> decodes to nothing


def main(argv: list[str]) -> None:
    del argv
    with_huge_page_heap()  # faster steps on CPU (glm_jax/host_memory.py)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    from glm_jax.data.sources import find_text_files, index_documents, read_document
    from glm_jax.generation import generate
    from glm_jax.modeling.transformer import GLMForCausalLM
    from glm_jax.sharding import make_mesh
    from glm_jax.tokenizer import ChatGLMTokenizer
    from glm_jax.training.checkpoint import Checkpointer
    from glm_jax.training.loop import TOKENIZER_FILE, train
    from glm_jax.training.metrics import plot_loss, read_metrics
    from glm_jax.training.optimizer import OptimizerConfig, make_optimizer
    from glm_jax.training.state import abstract_state

    config = FLAGS.config
    documents = [read_document(r, join_lines=config.data.join_lines)
                 for r in index_documents(find_text_files(config.data.path), config.data.split)]
    if not any(DEFINITION.match(d) for d in documents):
        raise app.UsageError(f"{config.data.path!r} holds no dictionary definitions (documents starting like "
                             "'WORD, n.') to evaluate the infilling on")
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="glm-demo-")
    print(f"== pre-training ({config.steps} steps) in {workdir}", flush=True)
    result = train(config, workdir)

    # Reload what was saved, to show the checkpoint is complete.
    model = GLMForCausalLM(result["model_config"])
    tx, _ = make_optimizer(OptimizerConfig(**{**dict(config.optimizer), "decay_steps": config.steps}))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    step, state, _ = checkpointer.restore_latest(abstract_state(model, tx, config.seq_len, mesh))
    checkpointer.close()
    params = state.params
    tokenizer = ChatGLMTokenizer(os.path.join(workdir, TOKENIZER_FILE))

    corpus_ids = np.concatenate([tokenizer.encode(d, add_special_tokens=False) for d in documents])
    baseline = unigram_entropy(corpus_ids)
    losses = [r["loss"] for r in read_metrics(workdir)]
    final = float(np.mean(losses[-3:]))
    png = plot_loss(workdir, os.path.join(workdir, "loss.png"), baseline=baseline)
    print(f"\n== checkpoint step {step}: final loss {final:.3f} nats/token (first logged {losses[0]:.3f}); "
          f"unigram baseline {baseline:.3f}; ratio {final / baseline:.2f}. Loss curve: {png}")

    candidates = [(d, longest_word_blank(tokenizer, d, model.config.mask_token_id))
                  for d in documents if DEFINITION.match(d)]
    definitions, blanks = zip(*evenly_spaced([(d, b) for d, b in candidates if b is not None], EVAL_DEFINITIONS))
    corpus = CorpusWords(documents)
    infills = fill_blanks_batch(model, params, tokenizer, blanks)
    print(f"\n== [MASK] infilling of the longest word in {len(blanks)} definitions of the training text (greedy)")
    for blank, infill in zip(blanks[:SHOWN_BLANKS], infills):
        print(f"  prompt: {blank.shown()}\n  model:  {infill!r}   corpus: {blank.answer!r}")
    rows = [("model", infills),
            (f"most frequent word ({corpus.most_frequent!r})", [corpus.most_frequent] * len(blanks)),
            ("most frequent word after the previous one", [corpus.bigram_guess(b) for b in blanks])]
    print(f"  {'infills of':42s} {'exact':>6s} {'starts with it':>15s} {'in context':>11s}")
    for name, guesses in rows:
        scores = score_infills(blanks, guesses, corpus)
        print(f"  {name:42s} {scores['exact']:6.0%} {scores['starts']:15.0%} {scores['in_context']:11.0%}")
    print("  (exact: the hidden word; starts with it: the hidden word, then maybe more; in context: the infill's "
          "words with one word on either side occur in a corpus definition)")

    print("\n== [gMASK] continuation of the first definitions' headwords (greedy with repetition penalty 1.2, "
          "then sampled)")
    heads = [headword(d) for d in definitions[:CONTINUED_HEADWORDS]]
    prompts = [tokenizer.encode(h) for h in heads]
    greedy = generate(model, params, prompts, max_new_tokens=40, repetition_penalty=1.2)
    sampled = generate(model, params, prompts, max_new_tokens=40, do_sample=True, top_p=0.8, temperature=0.8, seed=0)
    for head, g, s in zip(heads, greedy, sampled):
        print(f"  {head}\n    greedy:  {tokenizer.decode(g)}\n    sampled: {tokenizer.decode(s)}")


if __name__ == "__main__":
    app.run(main)
