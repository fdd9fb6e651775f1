"""The infilling evaluation of `make demo` (glm_jax/demo.py) on hand-made definitions and a hand-counted corpus."""

import pytest

from glm_jax.demo import (
    Blank, CorpusWords, evenly_spaced, fill_blanks_batch, headword, longest_word_blank, score_infills,
)
from glm_jax.tokenizer import ChatGLMTokenizer, train_chatglm_sentencepiece

DEFINITIONS = [
    "ABDICATION, n.  An act whereby a sovereign attests his sense of the high temperature of the throne.",
    "ABRIDGE, v.t.  To shorten, greatly.",
    "IMPUNITY, n.  Wealth.",
    "ABRACADABRA, n.  A spell.",
    "WOMAN, n.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_chatglm_sentencepiece(DEFINITIONS * 3, vocab_size=600, model_file=path)
    return ChatGLMTokenizer(path)


@pytest.mark.parametrize("definition, answer", [
    (DEFINITIONS[0], "temperature"),  # the longest word, several pieces
    (DEFINITIONS[1], "shorten"),  # first of two 7-letter words
    (DEFINITIONS[2], "Wealth"),  # follows a run of two spaces (a whitespace piece), not a space marker
    (DEFINITIONS[3], "spell"),  # the longer headword is never hidden
])
def test_longest_word_is_hidden_in_the_definitions_own_tokens(tokenizer, definition, answer):
    mask = tokenizer.mask_token_id
    blank = longest_word_blank(tokenizer, definition, mask)
    assert blank.answer == answer
    assert blank.shown() == definition.replace(answer, "[MASK]", 1)
    assert blank.shown(answer) == definition
    # Putting the hidden tokens back where the single [MASK] is gives the definition's tokens.
    full = tokenizer.encode(definition, add_special_tokens=False)
    assert blank.prompt_ids.count(mask) == 1 and mask not in full
    at = blank.prompt_ids.index(mask)
    hidden = full[at:at + len(full) - len(blank.prompt_ids) + 1]
    assert blank.prompt_ids[:at] + hidden + blank.prompt_ids[at + 1:] == full
    assert tokenizer.decode(hidden).strip() == answer


def test_a_headword_without_text_gives_no_blank(tokenizer):
    assert longest_word_blank(tokenizer, DEFINITIONS[4], tokenizer.mask_token_id) is None


def test_headword_is_the_entry_up_to_its_part_of_speech():
    assert headword(DEFINITIONS[0]) == "ABDICATION, n."
    assert headword(DEFINITIONS[1]) == "ABRIDGE, v.t."
    assert headword("WOMAN, n.") == "WOMAN, n."
    with pytest.raises(ValueError, match="not a dictionary definition"):
        headword("    Poor Isabella's Dead, whose abdication")


def test_evenly_spaced_takes_every_kth_item_from_the_first():
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spaced([1, 2], 4) == [1, 2]


CORPUS = ["The cat sat on the mat.", "the cat ate the fish. A dog sat.", "Is the cat's fish?"]


def blank(before: str, answer: str, after: str) -> Blank:
    return Blank([], before, answer, after)


def test_baselines_use_the_corpus_word_counts():
    corpus = CorpusWords(CORPUS)
    assert corpus.most_frequent == "the"  # 4 x "the" (and one "The"), 2 x "cat" / "sat"
    assert corpus.bigram_guess(blank("sees The ", "x", "")) == "cat"  # the/The -> cat 2, mat 1, fish 1, cat's 1
    assert corpus.bigram_guess(blank("the fish. A ", "x", "")) == "dog"
    assert corpus.bigram_guess(blank("a zebra ", "x", "")) == "the"  # unseen word: the most frequent word
    assert corpus.bigram_guess(blank("", "x", " sat")) == "the"  # nothing before the blank


def test_the_most_frequent_word_is_counted_after_the_part_of_speech():
    # "n" would win (4 to 3) if the entries' headers were counted.
    assert CorpusWords(["ABC, n.  A fish.", "DEF, n.  One fish.", "GHI, n.  Two fish, n."]).most_frequent == "fish"


def test_exact_match_and_in_context_rates():
    corpus = CorpusWords(CORPUS)
    blanks = [blank("the ", "cat", " ate the fish."), blank("A dog ", "sat", "."), blank("on the ", "mat", ".")]
    assert score_infills(blanks, ["cat", " sat ", "mat"], corpus) == {"exact": 1.0, "starts": 1.0, "in_context": 1.0}
    # "the dog ate" and "dog ate" never occur; "the cat" does (end of the blank's sentence: no word after).
    assert score_infills(blanks, ["dog", "ate", "cat"], corpus) == {
        "exact": 0.0, "starts": 0.0, "in_context": pytest.approx(1 / 3)}
    # Several words count as one infill (it starts with the hidden word, but "the cat sat on the ate" is
    # not in the corpus); "sat." starts with "sat", "sate" does not; an empty infill is never in context.
    assert score_infills(blanks, ["cat sat on the", "sate", ""], corpus) == {
        "exact": 0.0, "starts": pytest.approx(1 / 3), "in_context": 0.0}
    assert score_infills(blanks[1:], ["sat.", "."], corpus) == {"exact": 0.0, "starts": 0.5, "in_context": 0.5}
    assert corpus.in_context(blanks[0], "cat")
    assert corpus.in_context(blank("the ", "cat", "'s fish"), "cat")  # words are cut in the filled text
    assert not corpus.in_context(blank("the ", "cat", "'s fish"), "dog")
    assert not corpus.in_context(blanks[0], "cat sat on the mat the cat")  # across two documents
    with pytest.raises(ValueError):
        score_infills(blanks, ["cat"], corpus)


def test_batched_infills_equal_filling_each_definition_alone(tokenizer):
    """One left-padded `generate` call for all blanks gives the spans `fill_blanks` splices in one by one.

    The model is random, its weights scaled up tenfold so that its (arbitrary, deterministic) greedy
    tokens differ from prompt to prompt; an untied output layer keeps it from echoing `<sop>`."""
    import jax
    import jax.numpy as jnp

    from glm_jax.config import preset
    from glm_jax.generation import fill_blanks
    from glm_jax.modeling.transformer import GLMForCausalLM

    config = preset("chatglm-tiny", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
                    gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id,
                    tie_word_embeddings=False)
    model = GLMForCausalLM(config)
    params = jax.tree.map(lambda x: 10 * x, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    blanks = [longest_word_blank(tokenizer, d, tokenizer.mask_token_id) for d in DEFINITIONS[:4]]
    alone = []
    for b in blanks:
        filled = fill_blanks(model, params, b.prompt_ids, max_new_tokens=4)
        at = b.prompt_ids.index(tokenizer.mask_token_id)
        alone.append(tokenizer.decode(filled[at:at + len(filled) - len(b.prompt_ids) + 1]).strip())
    assert len(set(alone)) > 1
    assert fill_blanks_batch(model, params, tokenizer, blanks, max_new_tokens=4) == alone
