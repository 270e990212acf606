// lmforge playground: streams /v1/completions (server-sent events read with fetch + ReadableStream),
// or calls the task endpoint of a translation, summarization, sentiment or SRL checkpoint.
"use strict";

const $ = (id) => document.getElementById(id);
const TASKS = {
  lm: { button: "Generate", label: "Prompt", placeholder: "Type a prompt…" },
  translation: { button: "Translate", label: "Source text (one per line)", placeholder: "Text to translate…" },
  summarization: { button: "Summarize", label: "Document", placeholder: "Document to summarize…" },
  sentiment: { button: "Classify", label: "Texts (one per line)", placeholder: "a wonderful film" },
  srl: { button: "Label roles", label: "Sentences (one per line)", placeholder: "The cat chased the dog today ." },
};
let info = { model: null, task: "lm" };
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) { h.Authorization = "Bearer " + key; localStorage.setItem("lmforge-key", key); }
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  const span = document.createElement("span");
  span.className = "error";
  span.textContent = (($("output").textContent) ? "\n" : "") + "error: " + message;
  $("output").appendChild(span);
}

async function errorOf(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadInfo() {
  try {
    info = await (await fetch("/info")).json();
  } catch (e) {
    $("model").textContent = "server unreachable";
    return;
  }
  $("model").textContent = info.model + " · " + info.task + " · context " + info.context_length;
  const mode = TASKS[info.task] || TASKS.lm;
  $("generate").textContent = mode.button;
  $("prompt-label").textContent = mode.label;
  $("prompt").placeholder = mode.placeholder;
  $("lm-controls").hidden = info.task !== "lm";
  $("task-controls").hidden = !(info.task === "translation" || info.task === "summarization");
  $("key-row").hidden = !info.auth;
  $("api-key").value = localStorage.getItem("lmforge-key") || "";
}

function lines() {
  const text = $("prompt").value;
  return info.task === "summarization" ? [text] : text.split("\n").filter((t) => t.trim());
}

async function generate() {
  $("output").textContent = "";
  $("results").textContent = "";
  $("generate").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  const started = performance.now();
  try {
    if (info.task === "lm") await streamCompletion(started);
    else await runTask();
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped");
    else showError(e.message);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

async function streamCompletion(started) {
  const prompt = $("prompt").value;
  const body = {
    model: info.model, prompt: prompt, stream: true,
    max_tokens: parseInt($("max-tokens").value, 10) || 16,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value) || 1,
    stream_options: { include_usage: true },
  };
  const response = await fetch("/v1/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
  });
  if (!response.ok) { showError(await errorOf(response)); return; }
  const out = $("output");
  const shown = document.createElement("span");
  shown.className = "prompt";
  shown.textContent = prompt;
  out.appendChild(shown);
  const generated = document.createTextNode("");
  out.appendChild(generated);
  setStatus("generating…");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null, usage = null, first = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { showError(chunk.error.message); continue; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.text) {
            if (first === null) first = performance.now();
            generated.textContent += choice.text;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  const seconds = (performance.now() - started) / 1000;
  const parts = [];
  if (usage) parts.push(usage.completion_tokens + " tokens", (usage.completion_tokens / seconds).toFixed(1) + " tok/s");
  if (first !== null) parts.push("first token " + Math.round(first - started) + " ms");
  if (finish) parts.push("finish: " + finish);
  setStatus(parts.join(" · "));
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
  });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

function table(headings, rows) {
  const t = document.createElement("table");
  const head = t.insertRow();
  for (const h of headings) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
  for (const cells of rows) {
    const tr = t.insertRow();
    for (const c of cells) {
      const td = tr.insertCell();
      if (c instanceof Node) td.appendChild(c); else td.textContent = c;
    }
  }
  $("results").appendChild(t);
}

function bars(probabilities) {
  const box = document.createElement("div");
  for (const [label, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.textContent = label + " " + p.toFixed(3);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = Math.round(100 * p) + "%";
    row.appendChild(bar);
    box.appendChild(row);
  }
  return box;
}

async function runTask() {
  const texts = lines();
  if (!texts.length) { showError("give some text"); return; }
  setStatus("working…");
  const started = performance.now();
  if (info.task === "translation" || info.task === "summarization") {
    const body = { model: info.model, prompt: texts };
    const beam = parseInt($("beam-size").value, 10);
    if (beam > 0) body.beam_size = beam;
    const result = await post("/v1/completions", body);
    $("output").textContent = result.choices.map((c) => c.text).join("\n");
  } else if (info.task === "sentiment") {
    const result = await post("/v1/classify", { model: info.model, input: texts });
    $("output").textContent = result.data.map((d) => d.label + "\t" + d.text).join("\n");
    table(["text", "label", "probabilities"], result.data.map((d) => [d.text, d.label, bars(d.probabilities)]));
  } else if (info.task === "srl") {
    const result = await post("/v1/srl", { model: info.model, input: texts });
    $("output").textContent = result.data.map((d) => d.description).join("\n\n");
  }
  setStatus(Math.round(performance.now() - started) + " ms");
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
loadInfo();
