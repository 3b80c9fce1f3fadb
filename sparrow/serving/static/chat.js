// The chat page: keeps the conversation in memory, posts it to /v1/chat/completions with "stream": true and
// appends the server-sent deltas to the last message as they arrive. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let conversation = [];   // {role, content} turns sent with every request
let modelId = null;
let controller = null;   // aborts the running request (Stop, New chat)

async function loadModel() {
  const response = await fetch("/v1/models");
  const body = await response.json();
  modelId = body.data[0].id;
  $("model-name").textContent = `${modelId} (context ${body.data[0].context_length} tokens)`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function settings() {
  const body = {
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

// Yields the JSON payload of each "data:" event of a server-sent event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  conversation.push({role: "user", content: text});
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const system = $("system").value.trim();
  const messages = system ? [{role: "system", content: system}, ...conversation] : conversation;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating…";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: modelId, messages, stream: true, ...settings()}),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      answer.scrollIntoView({block: "end"});
    }
    conversation.push({role: "assistant", content: answer.textContent});
    $("status").textContent = finish === "length" ? "stopped at max tokens" : "done";
  } catch (error) {
    if (error.name === "AbortError") {
      conversation.push({role: "assistant", content: answer.textContent});
      $("status").textContent = "stopped";
    } else {
      answer.classList.add("error");
      answer.textContent += (answer.textContent ? "\n" : "") + `error: ${error.message}`;
      conversation.pop();  // the failed question is not part of the conversation
      $("status").textContent = "error";
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
});

loadModel().catch((error) => { $("status").textContent = `cannot reach the server: ${error.message}`; });
