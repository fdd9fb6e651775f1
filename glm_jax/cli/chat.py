"""glm-chat: streaming terminal chat with a ChatGLM-6B, ChatGLM2/3 or GLM-4 checkpoint (the chat format
and tokenizer follow the model family, see glm_jax.chat and glm_jax.auto_tokenizer).

    glm-chat --model=DIR                      # interactive
    printf '你好\\n晚上睡不着怎么办\\n' | glm-chat --model=DIR --nodo_sample

Each line read from stdin is one user turn; the answer is printed as it is generated. Type `clear`
to forget the history and `stop` (or `quit`, or end the input) to leave. Works the same on a
terminal and under a pipe: prompts and banners are shown only on a terminal; each answer goes to
stdout after `ChatGLM：` and ends with a newline.
"""

from __future__ import annotations

import sys

from absl import app, flags

from glm_jax.chat import DEFAULT_RESERVE_TOKENS, DEFAULT_SETTINGS, stream_chat
from glm_jax.cli import (
    define_model_flags, define_sampling_flags, enable_compilation_cache, load_model_and_tokenizer, quiet_backend_probing,
    sampling_settings,
)
from glm_jax.generation import PROGRAMS
from glm_jax.hf_io import CheckpointError

define_model_flags()
# Temperature, top-p and max_length default to the model family's official chat settings
# (glm_jax.chat.default_settings); do_sample and top_k are the same for every family.
define_sampling_flags(do_sample=DEFAULT_SETTINGS["do_sample"], temperature=None, top_p=None,
                      top_k=DEFAULT_SETTINGS["top_k"])
flags.DEFINE_integer("max_length", None, "Most tokens of history + question + answer. Default: the model family's "
                     "official chat setting (ChatGLM-6B 2048, ChatGLM2/3 and GLM-4 8192).")
flags.DEFINE_integer("reserve_tokens", DEFAULT_RESERVE_TOKENS, "Room kept for the answer; older rounds are dropped to keep it.")
FLAGS = flags.FLAGS

CLEAR_COMMANDS = ("clear",)
QUIT_COMMANDS = ("stop", "quit")


def _read_turns(interactive: bool):
    """User lines (stripped, non-empty) until end of input."""
    while True:
        try:
            line = input("\n用户：") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def _run() -> None:
    settings = sampling_settings(FLAGS)
    if FLAGS.max_length is not None:
        settings["max_length"] = FLAGS.max_length
    quiet_backend_probing()
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    model, params, tokenizer = load_model_and_tokenizer(FLAGS)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ChatGLM ({FLAGS.model}). '{CLEAR_COMMANDS[0]}' clears the history, '{QUIT_COMMANDS[0]}' quits.")
    history: list = []  # (query, response) pairs, or role messages for ChatGLM3 / GLM-4
    for query in _read_turns(interactive):
        if query in QUIT_COMMANDS:
            return
        if query in CLEAR_COMMANDS:
            history = []
            if interactive:
                print("(history cleared)")
            continue
        compiled_before = PROGRAMS.compile_seconds
        print("ChatGLM：", end="", flush=True)
        for piece, history in stream_chat(model, params, tokenizer, query, history, reserve_tokens=FLAGS.reserve_tokens,
                                          **settings):
            print(piece, end="", flush=True)
        print(flush=True)
        compiled = PROGRAMS.compile_seconds - compiled_before
        if compiled:
            print(f"(compiled in {compiled:.2f} s)", file=sys.stderr)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _run()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        sys.exit(f"glm-chat: {e}")
    except KeyboardInterrupt:
        print()


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
