// llmctl console: a chat playground and a live view of /metrics. Plain browser JavaScript, no dependencies.
// The API key lives in this tab's sessionStorage only and is sent as a Bearer token, like any other client.
"use strict";

const KEY_STORAGE = "llmctl.apiKey";
const METRICS_INTERVAL_MS = 1000;
const LATENCY_WINDOW_S = 60;
const CHART_POINTS = 120;

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, scrapes: [], tps: [], prefix: null };

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, kind) {
  const el = $("conn-status");
  el.textContent = text;
  el.className = "status " + (kind || "");
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

// -- connection and models ---------------------------------------------------------------------------------------
async function connect() {
  try {
    const resp = await fetch("/v1/models", { headers: headers(false) });
    if (resp.status === 401) {
      setStatus("API key needed", "bad");
      $("api-key").focus();
      return false;
    }
    if (!resp.ok) {
      setStatus(await errorMessage(resp), "bad");
      return false;
    }
    const models = (await resp.json()).data || [];
    const select = $("model");
    const previous = select.value;
    select.replaceChildren();
    for (const m of models) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.max_model_len ? `${m.id} (${m.max_model_len} ctx)` : m.id;
      select.appendChild(opt);
    }
    if (previous && models.some((m) => m.id === previous)) select.value = previous;
    setStatus("connected", "good");
    return true;
  } catch (e) {
    setStatus("server unreachable", "bad");
    return false;
  }
}

// -- chat ------------------------------------------------------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

function numberField(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  return Number.isFinite(n) ? n : undefined;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    const v = numberField(name);
    if (v !== undefined) body[name] = v;
  }
  const topK = numberField("top_k");
  if (topK !== undefined && topK !== -1) body.top_k = topK;
  return body;
}

// Yields the JSON payload of each `data:` line of a server-sent-event stream.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  $("chat-stats").textContent = "";
  const started = performance.now();
  let firstAt = null;
  let answer = "";
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          answer += piece;
          out.textContent = answer;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    state.history.push({ role: "assistant", content: answer });
    const seconds = (performance.now() - started) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    if (firstAt !== null) parts.push(`TTFT ${fmtSeconds((firstAt - started) / 1000)}`);
    if (usage && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    $("chat-stats").textContent = parts.join(" · ");
  } catch (e) {
    if (e.name === "AbortError") {
      state.history.push({ role: "assistant", content: answer });
      $("chat-stats").textContent = "stopped";
    } else {
      state.history.pop();  // the user turn failed: leave it out of the next request
      const err = addMessage("error", String(e.message || e));
      err.parentElement.classList.add("error");
    }
  } finally {
    out.parentElement.classList.remove("streaming");
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// -- metrics ---------------------------------------------------------------------------------------------------------
// Prometheus text format -> [{name, labels, value}]
function parseMetrics(text) {
  const samples = [];
  const line = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (!raw || raw[0] === "#") continue;
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const l of m[2].matchAll(label)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

// The server exports llmctl_* names by default and vLLM's vllm:* names with --metrics-prefix vllm.
const NAMES = {
  running: ["llmctl_num_requests_running", "vllm:num_requests_running"],
  waiting: ["llmctl_num_requests_waiting", "vllm:num_requests_waiting"],
  kv: ["llmctl_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"],
  gen: ["llmctl_generation_tokens_total", "vllm:generation_tokens_total"],
  prompt: ["llmctl_prompt_tokens_total", "vllm:prompt_tokens_total"],
  queries: ["llmctl_prefix_cache_queries_total", "vllm:prefix_cache_queries_total"],
  hits: ["llmctl_prefix_cache_hits_total", "vllm:prefix_cache_hits_total"],
  preempt: ["llmctl_num_preemptions_total", "vllm:num_preemptions_total"],
  finished: ["llmctl_requests_finished_total", "vllm:request_success_total"],
  ttft: ["llmctl_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"],
  itl: ["llmctl_inter_token_latency_seconds", "vllm:inter_token_latency_seconds"],
  e2e: ["llmctl_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"],
};

function total(samples, key) {
  for (const name of NAMES[key]) {
    const found = samples.filter((s) => s.name === name);
    if (found.length) return found.reduce((acc, s) => acc + s.value, 0);
  }
  return null;
}

// Cumulative bucket counts {le: count} of a histogram, summed over its label sets.
function buckets(samples, key) {
  for (const name of NAMES[key]) {
    const out = {};
    let seen = false;
    for (const s of samples) {
      if (s.name !== name + "_bucket") continue;
      seen = true;
      const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
      out[le] = (out[le] || 0) + s.value;
    }
    if (seen) return out;
  }
  return null;
}

// Prometheus' histogram_quantile: linear interpolation inside the bucket that holds the rank.
function quantile(q, cumulative) {
  const bounds = Object.keys(cumulative).map(Number).sort((a, b) => a - b);
  if (!bounds.length) return null;
  const count = cumulative[bounds[bounds.length - 1]];
  if (!(count > 0)) return null;
  const rank = q * count;
  let prevBound = 0;
  let prevCount = 0;
  for (const b of bounds) {
    const c = cumulative[b];
    if (c >= rank) {
      if (b === Infinity) return prevBound;
      if (c === prevCount) return b;
      return prevBound + (b - prevBound) * ((rank - prevCount) / (c - prevCount));
    }
    prevBound = b;
    prevCount = c;
  }
  return prevBound;
}

function subtract(now, then) {
  const out = {};
  for (const k of Object.keys(now)) out[k] = now[k] - ((then && then[k]) || 0);
  return out;
}

function fmtSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "-";
  return s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`;
}

function fmtCount(n) {
  return n === null ? "-" : Math.round(n).toLocaleString("en-US");
}

function renderLatency(now, samples) {
  const current = {};
  for (const key of ["ttft", "itl", "e2e"]) current[key] = buckets(samples, key);
  state.scrapes.push({ t: now, hist: current });
  while (state.scrapes.length && now - state.scrapes[0].t > LATENCY_WINDOW_S * 1000) state.scrapes.shift();
  const oldest = state.scrapes[0];
  let windowed = true;
  const recent = {};
  for (const key of Object.keys(current)) {
    if (!current[key]) continue;
    recent[key] = subtract(current[key], oldest.hist[key]);
  }
  const anyRecent = Object.values(recent).some((h) => h && h[Infinity] > 0);
  const use = anyRecent ? recent : current;
  if (!anyRecent) windowed = false;
  for (const key of ["ttft", "itl", "e2e"]) {
    for (const [q, col] of [[0.5, "p50"], [0.9, "p90"], [0.99, "p99"]]) {
      $(`${key}-${col}`).textContent = use[key] ? fmtSeconds(quantile(q, use[key])) : "-";
    }
  }
  $("latency-window").textContent = windowed ? `percentiles over the last ${LATENCY_WINDOW_S} s`
    : "percentiles since the server started";
}

function drawChart() {
  const canvas = $("m-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const values = state.tps;
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#d0d7de";
  ctx.beginPath();
  ctx.moveTo(0, h - 0.5);
  ctx.lineTo(w, h - 0.5);
  ctx.stroke();
  ctx.fillStyle = "#57606a";
  ctx.font = "11px sans-serif";
  ctx.fillText(`${max.toFixed(0)} tok/s`, 4, 12);
  if (values.length < 2) return;
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (CHART_POINTS - 1)) * w;
    const y = h - 2 - (v / max) * (h - 18);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

async function pollMetrics() {
  try {
    const resp = await fetch("/metrics", { headers: headers(false) });
    if (!resp.ok) {
      $("metrics-age").textContent = resp.status === 401 ? "(API key needed)" : `(${await errorMessage(resp)})`;
      return;
    }
    const samples = parseMetrics(await resp.text());
    const now = performance.now();
    const running = total(samples, "running");
    const waiting = total(samples, "waiting");
    const kv = total(samples, "kv");
    $("m-running").textContent = fmtCount(running);
    $("m-waiting").textContent = fmtCount(waiting);
    $("m-kv").textContent = kv === null ? "-" : `${(kv * 100).toFixed(1)} %`;
    $("m-kv-bar").style.width = `${Math.min(100, (kv || 0) * 100)}%`;
    const gen = total(samples, "gen");
    if (state.prev && gen !== null) {
      const dt = (now - state.prev.t) / 1000;
      const rate = dt > 0 ? Math.max(0, gen - state.prev.gen) / dt : 0;
      state.tps.push(rate);
      if (state.tps.length > CHART_POINTS) state.tps.shift();
      $("m-tps").textContent = rate.toFixed(1);
    }
    state.prev = { t: now, gen };
    const queries = total(samples, "queries");
    const hits = total(samples, "hits");
    $("m-prefix").textContent = queries ? `${((hits / queries) * 100).toFixed(1)} %` : "-";
    $("m-preempt").textContent = fmtCount(total(samples, "preempt"));
    $("m-finished").textContent = fmtCount(total(samples, "finished"));
    $("m-prompt-tokens").textContent = fmtCount(total(samples, "prompt"));
    $("m-gen-tokens").textContent = fmtCount(gen);
    renderLatency(now, samples);
    drawChart();
    $("metrics-age").textContent = `(updated ${new Date().toLocaleTimeString()})`;
  } catch (e) {
    $("metrics-age").textContent = "(server unreachable)";
  }
}

// -- wiring ----------------------------------------------------------------------------------------------------------
function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    connect();
    pollMetrics();
  });
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren();
    $("chat-stats").textContent = "";
  });
  connect();
  pollMetrics();
  setInterval(pollMetrics, METRICS_INTERVAL_MS);
}

document.addEventListener("DOMContentLoaded", init);
