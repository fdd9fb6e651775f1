"""glm-serve with role-token chat models (ChatGLM3, GLM-4) over real HTTP on 127.0.0.1: system
messages keep their role, answers stop at <|user|> / <|observation|> like the official chat, the
family's sampling defaults apply, and the official api.py endpoint keeps its (query, response) pairs.

Expected answers come from the official references of `test_chat_roles` (prompt ids built from the
spec's layout, `glm_jax.generate` without stop ids, the official decode and `process_response`)."""

from __future__ import annotations

import httpx
import pytest

from glm_jax import generate
from glm_jax.chat import chat
from serve_helpers import MODEL_NAME, running_server, sse_events
from test_chat_roles import (  # noqa: F401 (fixtures)
    G4, STEPS, glm3, glm3_dir, glm4, ids3, official_decode_chatglm3, official_decode_glm4, official_process_response,
    prompt3, stopping_params, until_stop,
)
from test_tokenizer_glm2_glm4 import sp, sp_file  # noqa: F401 (fixtures)

SYSTEM = {"role": "system", "content": "Be brief."}
HISTORY = [SYSTEM, {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋"}]
QUERY = "今天天气很好"
TIMEOUT = 120


@pytest.fixture(scope="module")
def case(glm3, sp, ids3):  # noqa: F811
    """(prompt ids, params that stop at <|user|> on that prompt, expected response)."""
    model, params, _ = glm3
    prompt = prompt3(sp, ids3, HISTORY + [{"role": "user", "content": QUERY}])
    stopping = stopping_params(model, params, prompt, ids3["user"])
    raw = generate(model, stopping, [prompt], max_new_tokens=STEPS, stop_ids=())[0]
    answer = until_stop(raw, (2, ids3["user"], ids3["observation"]))
    response, _ = official_process_response(official_decode_chatglm3(sp, answer), [])
    return prompt, stopping, response, len(answer) + 1


@pytest.fixture(scope="module")
def client(glm3, case):  # noqa: F811
    model, _, tok = glm3
    with running_server((model, case[1]), tok, max_batch=2, decode_chunk=2) as (url, _):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            yield c


def body(messages, **fields):
    return {"model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": STEPS, **fields}


def test_chat_completion_keeps_roles_and_stops_at_user(client, case):
    prompt, _, expected, new_tokens = case
    response = client.post("/v1/chat/completions", json=body(HISTORY + [{"role": "user", "content": QUERY}]))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "stop"
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)
    assert response.json()["usage"]["completion_tokens"] == new_tokens
    developer = [{"role": "developer", "content": "Be brief."}] + HISTORY[1:] + [{"role": "user", "content": QUERY}]
    assert client.post("/v1/chat/completions", json=body(developer)).json()["choices"][0] == choice


def test_streamed_chat_completion(client, case):
    _, _, expected, _ = case
    with client.stream("POST", "/v1/chat/completions",
                       json=body(HISTORY + [{"role": "user", "content": QUERY}], stream=True)) as response:
        assert response.status_code == 200
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_omitted_sampling_fields_take_the_chatglm3_defaults(client, glm3, case):  # noqa: F811
    model, _, tok = glm3
    prompt, stopping, _, _ = case
    expected, _ = chat(model, stopping, tok, QUERY, HISTORY, seed=11, max_length=len(prompt) + STEPS, reserve_tokens=1)
    request = {"model": MODEL_NAME, "messages": HISTORY + [{"role": "user", "content": QUERY}], "max_tokens": STEPS,
               "seed": 11}  # chat's defaults: top_p 0.8, temperature 0.8, top_k 50
    assert client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"] == expected


def test_official_endpoint_takes_and_returns_pairs(client, glm3, case):  # noqa: F811
    model, _, tok = glm3
    _, stopping, _, _ = case
    pairs = [["你好", "你好👋"]]
    expected, history = chat(model, stopping, tok, QUERY, [tuple(p) for p in pairs], do_sample=False, max_length=64)
    assert history[:2] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋"}]
    response = client.post("/", json={"prompt": QUERY, "history": pairs, "max_length": 64, "temperature": 0.0})
    assert response.status_code == 200, response.text
    assert response.json()["response"] == expected
    assert response.json()["history"] == pairs + [[QUERY, expected]]


def test_glm4_chat_completion_stops_at_observation(glm4):  # noqa: F811
    model, params, tok = glm4
    prompt = [G4["[gMASK]"], G4["<sop>"], G4["<|system|>"], 10, 259, 264, G4["<|user|>"], 10, 259, G4["<|assistant|>"]]
    stopping = stopping_params(model, params, prompt, G4["<|observation|>"])
    raw = generate(model, stopping, [prompt], max_new_tokens=STEPS, stop_ids=())[0]
    answer = until_stop(raw, (G4["<|endoftext|>"], G4["<|user|>"], G4["<|observation|>"]))
    expected, _ = official_process_response(official_decode_glm4(answer), [])
    messages = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "hello"}]
    with running_server((model, stopping), tok, max_batch=1) as (url, _):
        response = httpx.post(f"{url}/v1/chat/completions", json=body(messages), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected
    assert response.json()["choices"][0]["finish_reason"] == "stop"
