// The playground: sends the form to /v1/completions with stream: true and appends each event's text; in chat mode,
// sends the conversation so far to /v1/chat/completions and appends the reply to the messages list.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function headers() {
  const key = $("api_key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` }
             : { "Content-Type": "application/json" };
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

async function servedModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error.message);
  return body.data[0].id;
}

// Reads server-sent events from a fetch response; calls onData with each event's data line.
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data && onData(data) === false) return;
    }
  }
}

const history = [];  // chat mode: the conversation's {role, content} messages

function sampling() {
  return {
    stream: true,
    max_tokens: numberField("max_tokens"), temperature: numberField("temperature"), top_p: numberField("top_p"),
    top_k: numberField("top_k"), repetition_penalty: numberField("repetition_penalty"), seed: numberField("seed"),
  };
}

function addMessage(role, content) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = content;
  $("messages").append(item);
  return item;
}

// Completions mode: the prompt, then the completion as it streams. Returns where the text goes and the request.
function completionRequest() {
  const output = $("output");
  output.textContent = "";
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt";
  promptSpan.textContent = $("prompt").value;
  const completion = document.createElement("span");
  completion.id = "completion";
  output.append(promptSpan, completion);
  return { target: completion, path: "/v1/completions", body: { ...sampling(), prompt: $("prompt").value },
           pieceOf: (choice) => choice.text };
}

// Chat mode: the user's message joins the conversation, the reply streams into a new assistant message.
function chatRequest() {
  const content = $("prompt").value;
  history.push({ role: "user", content });
  addMessage("user", content);
  $("prompt").value = "";
  const previous = $("reply");
  if (previous) previous.removeAttribute("id");
  const reply = addMessage("assistant", "");
  reply.id = "reply";
  return { target: reply, path: "/v1/chat/completions", body: { ...sampling(), messages: history.slice() },
           pieceOf: (choice) => choice.delta.content || "",
           done: () => history.push({ role: "assistant", content: reply.textContent }) };
}

async function generate() {
  $("status").textContent = "";
  const request = $("chat_mode").checked ? chatRequest() : completionRequest();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    request.body.model = await servedModel();
    const response = await fetch(request.path, {
      method: "POST", headers: headers(), body: JSON.stringify(request.body), signal: controller.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const choice = JSON.parse(data).choices[0];
      request.target.textContent += request.pieceOf(choice);
      if (choice.finish_reason) $("status").textContent = `끝 (${choice.finish_reason})`;
      return true;
    });
    if (request.done) request.done();
  } catch (error) {
    if (error.name !== "AbortError") $("status").textContent = `오류: ${error.message}`;
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

$("chat_mode").addEventListener("change", () => {
  history.length = 0;
  $("messages").textContent = "";
  $("messages").hidden = !$("chat_mode").checked;
  $("output").hidden = $("chat_mode").checked;
  $("prompt").placeholder = $("chat_mode").checked ? "보낼 메시지를 입력하세요" : "이어 쓸 글을 입력하세요";
});
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
servedModel().then((id) => { $("model").textContent = id; }).catch(() => {});
