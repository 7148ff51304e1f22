// The playground: sends the form to /v1/completions with stream: true and appends each event's text.
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

async function generate() {
  const output = $("output");
  output.textContent = "";
  $("status").textContent = "";
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt";
  promptSpan.textContent = $("prompt").value;
  const completion = document.createElement("span");
  completion.id = "completion";
  output.append(promptSpan, completion);
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const body = {
      model: await servedModel(), prompt: $("prompt").value, stream: true,
      max_tokens: numberField("max_tokens"), temperature: numberField("temperature"), top_p: numberField("top_p"),
      top_k: numberField("top_k"), repetition_penalty: numberField("repetition_penalty"), seed: numberField("seed"),
    };
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const choice = JSON.parse(data).choices[0];
      completion.textContent += choice.text;
      if (choice.finish_reason) $("status").textContent = `끝 (${choice.finish_reason})`;
      return true;
    });
  } catch (error) {
    if (error.name !== "AbortError") $("status").textContent = `오류: ${error.message}`;
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
servedModel().then((id) => { $("model").textContent = id; }).catch(() => {});
