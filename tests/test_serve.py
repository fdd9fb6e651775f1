"""glm-serve over real HTTP on 127.0.0.1: answers equal `glm_jax.chat` greedy output (whole and
streamed), 16 concurrent requests, the official api.py endpoint, the OpenAI Python client, request
errors and limits, and a client that disconnects mid-stream freeing its row."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from glm_jax import generate
from glm_jax.chat import build_prompt, chat
from glm_jax.generation import PROGRAMS
from glm_jax.sampling import SamplingParams
from glm_jax.serve import Engine, GenerationRequest, ServeLimits
from glm_jax.serve.engine import EngineClosed
from glm_jax.serve.protocol import OfficialChatRequest
from decoding_helpers import chat_model, chat_model_dir, chat_tok  # noqa: F401 (fixtures)
from serve_helpers import MODEL_NAME, greedy_chat, messages, running_server, sse_events

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 40
HISTORY = [("你好", "你好👋！我是人工智能助手")]
HISTORY_2 = [("今天天气很好", "我们去公园散步吧")]
TIMEOUT = 120


@pytest.fixture(scope="module")
def server(chat_model, chat_tok):  # noqa: F811
    limits = ServeLimits(max_body_bytes=64 * 1024, max_new_tokens=2048)
    # The chat prompts of these tests have 33..64 tokens and ask for MAX_TOKENS: one prompt bucket (64),
    # one new-token bucket (64), compiled up front for both batch sizes.
    with running_server(chat_model, chat_tok, api_key=API_KEY, limits=limits, max_batch=16, batch_buckets=(1, 16),
                        decode_chunk=2, warmup=(64, MAX_TOKENS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=TIMEOUT) as c:
        yield c


def chat_body(query, history=(), **fields):
    return {"model": MODEL_NAME, "messages": messages(query, history), "temperature": 0, "max_tokens": MAX_TOKENS,
            **fields}


def finish_reason(new_ids, tok):
    return "stop" if new_ids and new_ids[-1] == tok.eos_token_id else "length"


# ------------------------------------------------------------------------------ chat == glm_jax.chat


def test_chat_completion_equals_greedy_chat(client, chat_model, chat_tok):  # noqa: F811
    expected, new_ids = greedy_chat(chat_model, chat_tok, "今天天气很好", HISTORY, MAX_TOKENS)
    compiled = PROGRAMS.compile_seconds
    response = client.post("/v1/chat/completions", json=chat_body("今天天气很好", HISTORY))
    assert response.status_code == 200, response.text
    assert PROGRAMS.compile_seconds == compiled  # Engine.warmup compiled this request's programs
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] == finish_reason(new_ids, chat_tok)
    prompt_tokens = len(chat_tok.encode("[Round 0]\n问：你好\n答：你好👋！我是人工智能助手\n[Round 1]\n问：今天天气很好\n答："))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(new_ids),
                             "total_tokens": prompt_tokens + len(new_ids)}


def test_streamed_chat_completion_equals_greedy_chat(client, chat_model, chat_tok):  # noqa: F811
    expected, new_ids = greedy_chat(chat_model, chat_tok, "今天天气很好", HISTORY, MAX_TOKENS)
    body = chat_body("今天天气很好", HISTORY, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(pieces) == expected
    assert sum(1 for p in pieces if p) > 1  # streamed, not one block
    assert chunks[-1]["choices"][0]["finish_reason"] == finish_reason(new_ids, chat_tok)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(new_ids)


def test_sixteen_concurrent_requests_all_answer_correctly(server, chat_model, chat_tok):  # noqa: F811
    url, engine = server
    cases = [(f"第{i}个问题：今天天气很好吗", HISTORY) if i % 2 else (f"{i}号：晚上睡不着应该怎么办？", HISTORY_2)
             for i in range(16)]
    expected = [greedy_chat(chat_model, chat_tok, q, h, MAX_TOKENS)[0] for q, h in cases]
    before = engine.stats()

    async def ask(http, i):
        query, history = cases[i]
        if i % 4 == 0:  # a quarter streams
            async with http.stream("POST", "/v1/chat/completions", json=chat_body(query, history, stream=True)) as r:
                assert r.status_code == 200
                events = sse_events([line async for line in r.aiter_lines()])
            return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        r = await http.post("/v1/chat/completions", json=chat_body(query, history))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def ask_all():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=TIMEOUT, limits=limits) as http:
            return await asyncio.gather(*(ask(http, i) for i in range(16)))

    answers = asyncio.run(ask_all())
    assert answers == expected
    after = engine.stats()
    assert after.completed - before.completed == 16 and after.failed == before.failed
    assert after.batches - before.batches < 16 and after.largest_batch > 1  # requests shared batches


def test_sampled_request_alone_equals_chat_with_the_same_seed(client, chat_model, chat_tok):  # noqa: F811
    model, params = chat_model
    prompt_tokens = len(chat_tok.encode("[Round 0]\n问：你好\n答：你好👋！我是人工智能助手\n[Round 1]\n问：今天天气很好\n答："))
    expected, _ = chat(model, params, chat_tok, "今天天气很好", HISTORY, do_sample=True, temperature=0.8, top_p=0.9,
                       top_k=50, seed=7, max_length=prompt_tokens + MAX_TOKENS, reserve_tokens=1)
    body = chat_body("今天天气很好", HISTORY, temperature=0.8, top_p=0.9, seed=7)  # top_k: the chat default, 50
    answers = [client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
               for _ in range(2)]
    assert answers == [expected, expected]


# --------------------------------------------------------------------------- official api.py endpoint


def test_official_api_endpoint_answers_like_chat(client, chat_model, chat_tok):  # noqa: F811
    query = "今天天气很好"
    expected, _ = greedy_chat(chat_model, chat_tok, query, HISTORY, MAX_TOKENS)
    prompt_tokens = len(chat_tok.encode("[Round 0]\n问：你好\n答：你好👋！我是人工智能助手\n[Round 1]\n问：今天天气很好\n答："))
    body = {"prompt": query, "history": [list(h) for h in HISTORY], "max_length": prompt_tokens + MAX_TOKENS,
            "temperature": 0}
    response = client.post("/", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["response"] == expected and answer["status"] == 200
    assert answer["history"] == [list(HISTORY[0]), [query, expected]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])


def test_official_api_fallbacks_are_the_official_ones():
    # api.py: max_length 2048, top_p 0.7, temperature 0.95 when missing; chat() samples with top_k 50.
    settings = OfficialChatRequest(prompt="你好", history=None, max_length=None, top_p=None).settings()
    assert settings == dict(max_length=2048, top_p=0.7, temperature=0.95, do_sample=True, top_k=50)


# ------------------------------------------------------------------------------ the OpenAI client


def test_openai_python_client(server, chat_model, chat_tok):  # noqa: F811
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    expected, new_ids = greedy_chat(chat_model, chat_tok, "今天天气很好", HISTORY, MAX_TOKENS)
    completion = client.chat.completions.create(model=MODEL_NAME, messages=messages("今天天气很好", HISTORY),
                                                temperature=0, max_tokens=MAX_TOKENS)
    assert completion.choices[0].message.content == expected
    assert completion.usage.completion_tokens == len(new_ids)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages("今天天气很好", HISTORY),
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected

    model, params = chat_model
    prompt = "晚上睡不着应该怎么办？可以试试听音乐、看书或者散步。"
    raw = chat_tok.decode(generate(model, params, [chat_tok.encode(prompt)], max_new_tokens=MAX_TOKENS)[0])
    text = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert text.choices[0].text == raw
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == raw

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages("你好"))


# ------------------------------------------------------------------------------- errors and limits


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_malformed_json_is_400(client):
    error = error_of(client.post("/v1/chat/completions", content=b'{"model": "chatglm-tiny", "messages": [',
                                 headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    error = error_of(client.post("/", content=b"{prompt: hi}"), 400)
    assert "not valid JSON" in error["message"]


def test_unknown_model_is_404(client):
    error = error_of(client.post("/v1/chat/completions", json={**chat_body("你好"), "model": "gpt-4"}), 404)
    assert error["code"] == "model_not_found" and "gpt-4" in error["message"]
    assert error_of(client.post("/v1/completions", json={"model": "x", "prompt": "hi"}), 404)["param"] == "model"
    assert error_of(client.get("/v1/models/x"), 404)["code"] == "model_not_found"


def test_over_long_prompt_is_400_with_a_clear_message(client, chat_tok):  # noqa: F811
    query = "今天天气很好，我们去公园散步吧。" * 300
    error = error_of(client.post("/v1/chat/completions", json=chat_body(query)), 400)
    assert error["code"] == "context_length_exceeded"
    tokens = len(chat_tok.encode(query))
    assert f"the prompt has {tokens} tokens" in error["message"] and "2047" in error["message"]
    # A prompt that fits, but not with the new tokens asked for.
    error = error_of(client.post("/v1/chat/completions", json=chat_body("你好", max_tokens=2046)), 400)
    assert "maximum context length is 2048 tokens" in error["message"]
    assert "max_tokens asks for 2046" in error["message"]
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4096}
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert "over this server's limit of 2048" in error["message"]


def test_oversize_body_is_413(client):
    body = {"model": MODEL_NAME, "messages": messages("好" * 70_000)}  # > 64 KiB of JSON
    assert error_of(client.post("/v1/chat/completions", json=body), 413)["code"] == "request_too_large"


def test_bad_fields_are_400_naming_the_field(client):
    cases = [
        ({**chat_body("你好"), "messages": []}, "messages"),
        ({**chat_body("你好"), "temperature": -1}, "temperature"),
        ({**chat_body("你好"), "top_p": 0}, "top_p"),
        ({**chat_body("你好"), "n": 3}, "n=3"),
        ({**chat_body("你好"), "messages": messages("你好") + [{"role": "assistant", "content": "x"}]}, "last message"),
        ({**chat_body("你好"), "messages": [{"role": "user", "content": "a"}] * 2}, "alternate"),
        ({**chat_body("你好"), "stop": ["\n"]}, "stop"),
    ]
    for body, named in cases:
        assert named in error_of(client.post("/v1/chat/completions", json=body), 400)["message"], body
    assert "prompt" in error_of(client.post("/", json={"history": []}), 400)["message"]


def test_api_key_is_required(server):
    url, _ = server
    assert error_of(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/", json={"prompt": "你好"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{url}/").status_code == 200  # the page itself is public; its API calls send the key


# --------------------------------------------------------------------------------- disconnects


def test_client_disconnect_mid_stream_frees_its_slot(server, client, chat_model, chat_tok):  # noqa: F811
    url, engine = server
    before = engine.stats()
    body = chat_body("今天天气很好", HISTORY, stream=True, max_tokens=2000)
    with httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT) as own:
        with own.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content"' in line and '"role"' not in line:
                    break  # got the first piece: hang up with ~2000 tokens still to go
    deadline = time.monotonic() + 60
    while (stats := engine.stats()).cancelled == before.cancelled or stats.active:
        assert time.monotonic() < deadline, f"the abandoned request is still running: {stats}"
        time.sleep(0.05)
    assert stats.generated_tokens - before.generated_tokens < 1000  # stopped long before its 2000 tokens
    # The row is free: the next request is served at once.
    expected, _ = greedy_chat(chat_model, chat_tok, "今天天气很好", HISTORY, MAX_TOKENS)
    response = client.post("/v1/chat/completions", json=chat_body("今天天气很好", HISTORY))
    assert response.json()["choices"][0]["message"]["content"] == expected


def test_closing_the_engine_cancels_the_running_batch(chat_model, chat_tok):  # noqa: F811
    model, params = chat_model
    engine = Engine(model, params, max_batch=1)
    prompt = tuple(chat_tok.encode(build_prompt("今天天气很好", HISTORY)))

    async def generate_then_close():
        engine.start()
        handle = engine.submit(GenerationRequest(prompt, 2000, SamplingParams(), 0, engine.stop_ids))
        events = [await handle.next_event()]  # under way: 2000 tokens take seconds
        await asyncio.to_thread(engine.close)
        while not events[-1].final:
            events.append(await handle.next_event())
        with pytest.raises(EngineClosed):
            engine.submit(GenerationRequest(prompt, 8))
        return events

    events = asyncio.run(generate_then_close())
    assert events[-1].finish_reason == "cancelled"
    assert sum(len(e.tokens) for e in events) < 1000


# ---------------------------------------------------------------------------------------- the CLI


def test_glm_serve_binds_to_loopback_and_serves(chat_model_dir, tmp_path):  # noqa: F811
    process = subprocess.Popen(
        [sys.executable, "-m", "glm_jax.cli.serve", f"--model={chat_model_dir}", "--port=0", "--model_name=tiny",
         f"--compilation_cache_dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "GLM_SERVE_API_KEY": "k"},
    )
    try:
        url = None
        for line in process.stdout:  # uvicorn logs the bound address once the app has started
            if m := re.search(r"running on (http://\S+)", line, re.IGNORECASE):
                url = m.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:"), "no startup line on loopback"
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}, timeout=TIMEOUT).json()
        assert models["data"][0]["id"] == "tiny"
        assert httpx.get(f"{url}/v1/models", timeout=TIMEOUT).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=60)
    bad = subprocess.run([sys.executable, "-m", "glm_jax.cli.serve", f"--model={tmp_path}/missing"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode == 1 and "no such checkpoint directory" in bad.stderr and "Traceback" not in bad.stderr
