// Web chat for glm-serve: streams /v1/chat/completions (server-sent events) into the page.
// The history is kept here, in the page, and sent with every message as OpenAI-style messages.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // [user text, assistant text] pairs of finished rounds
let modelId = null;
let running = null;  // AbortController of the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    modelId = (await response.json()).data[0].id;
    $("model").textContent = modelId;
  } catch (e) {
    $("model").textContent = "model list unavailable: " + e.message;
  }
}

// Calls onData(parsed JSON) for every `data:` event of an SSE body; resolves at [DONE] or the end.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(query) {
  if (!modelId) await loadModel();
  addMessage("user", query);
  const answer = addMessage("assistant", "");
  answer.dataset.state = "streaming";
  answer.dataset.chunks = "0";
  const messages = [];
  for (const [q, r] of history) messages.push({ role: "user", content: q }, { role: "assistant", content: r });
  messages.push({ role: "user", content: query });
  const body = {
    model: modelId, messages, stream: true,
    max_tokens: Number($("max_tokens").value),
    top_p: Number($("top_p").value),
    temperature: Number($("temperature").value),
  };
  running = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (delta) {
        answer.textContent += delta;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        answer.scrollIntoView({ block: "end" });
      }
    });
    history.push([query, answer.textContent]);
    answer.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      history.push([query, answer.textContent]);  // what was shown stays in the conversation
      answer.dataset.state = "done";
    } else {
      answer.dataset.state = "error";
      answer.textContent += (answer.textContent ? "\n" : "") + "Error: " + e.message;
    }
  } finally {
    running = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function showSliderValues() {
  for (const id of ["max_tokens", "top_p", "temperature"]) $(id + "_value").textContent = $(id).value;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("input").value.trim();
  if (!query || running) return;
  $("input").value = "";
  send(query);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", () => {
  if (running) running.abort();
  history.length = 0;
  $("messages").replaceChildren();
});
for (const id of ["max_tokens", "top_p", "temperature"]) $(id).addEventListener("input", showSliderValues);
$("api_key").addEventListener("change", loadModel);
showSliderValues();
loadModel();
