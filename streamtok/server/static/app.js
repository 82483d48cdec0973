// streamtok browser client: microphone -> AudioWorklet -> WebSocket (msgpack, docs/PROTOCOL.md)
// -> a live heatmap of the codes, with latency. No build step; served by the daemon at "/".
//
// Page address parameters: ?token=T (passed on to the WebSocket URL), ?model=NAME,
// ?codebooks=K, ?server=ws://host:port/ (default: the server that served this page).
// window.streamtok exposes the session state (for the console and for tests).

import { decode, encode } from "./msgpack.js";

const PROTOCOL_VERSION = 1;
const LATENCY_WINDOW = 250; // frames the percentiles cover
const COLUMN_PX = 3; // heatmap column width per frame, CSS pixels

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const state = {
  status: "idle", // idle | connecting | streaming | stopping | stopped | error
  frames: 0, // frames received
  lastIndex: -1,
  samplesSent: 0, // input samples sent (at inputRate)
  inputRate: null,
  model: null, // ready.model
  outputs: null,
  sendHintMs: 40,
  latencies: [], // seconds, last LATENCY_WINDOW frames
  serverLatencies: [],
  serverStats: {},
  lastFlushed: null,
  closeCode: null,
  errors: [], // everything that went wrong, as strings
  startedAt: null,
  stoppedAt: null,
};
window.streamtok = state;

let session = null; // the live session's resources

// -- errors ----------------------------------------------------------------------------------------
function showError(message) {
  state.errors.push(message);
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

window.addEventListener("error", (e) => showError(`page error: ${e.message}`));
window.addEventListener("unhandledrejection", (e) => showError(`page error: ${e.reason}`));

function setStatus(status) {
  state.status = status;
  const pill = $("status");
  pill.textContent = status;
  pill.className = `pill ${status}`;
  const busy = status === "connecting" || status === "streaming" || status === "stopping";
  $("start").disabled = busy;
  $("stop").disabled = status !== "streaming";
  for (const id of ["server", "model", "codebooks"]) $(id).disabled = busy;
}

// -- the WebSocket URL -----------------------------------------------------------------------------
function defaultServer() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/`;
}

function socketUrl() {
  const url = new URL($("server").value.trim() || defaultServer(), location.href);
  const token = params.get("token");
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

// -- send-time bookkeeping for latency -------------------------------------------------------------
// Latency of frame i = its receive time - the send time of the packet holding the last input
// sample it needs: (i / frame_rate + delay_ms / 1000) s of input (PROTOCOL.md §6).
class SendLog {
  constructor() { this.counts = []; this.times = []; this.head = 0; this.closedAt = null; }
  sent(total, when) { this.counts.push(total); this.times.push(when); }
  completedAt(needed) {
    while (this.head < this.counts.length && this.counts[this.head] < needed) this.head++;
    if (this.head > 4096) { // keep the arrays short on long sessions
      this.counts.splice(0, this.head); this.times.splice(0, this.head); this.head = 0;
    }
    return this.head < this.times.length ? this.times[this.head] : this.closedAt;
  }
}

function percentile(values, q) {
  if (!values.length) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo] + (s[hi] - s[lo]) * (pos - lo);
}

function pushWindow(list, value) {
  list.push(value);
  if (list.length > LATENCY_WINDOW) list.shift();
}

// -- heatmap ---------------------------------------------------------------------------------------
// Viridis as a degree-6 polynomial per channel (a close fit of matplotlib's table).
const VIRIDIS = [
  [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
  [0.1050930431085774, 1.404613529898575, 1.384590162594685],
  [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
  [-4.634230498983486, -5.799100973351585, -19.33244095627987],
  [6.228269936347081, 14.17993336680509, 56.69055260068105],
  [4.776384997670288, -13.74514537774601, -65.35303263337234],
  [-5.435455855934631, 4.645852612178535, 26.3124352495832],
];
const PALETTE = Array.from({ length: 256 }, (_, i) => {
  const t = i / 255;
  const rgb = [0, 1, 2].map((c) => {
    let v = 0;
    for (let k = VIRIDIS.length - 1; k >= 0; k--) v = v * t + VIRIDIS[k][c];
    return Math.round(255 * Math.min(1, Math.max(0, v)));
  });
  return `rgb(${rgb.join(",")})`;
});

class Heatmap {
  constructor(canvas, levelList) {
    this.canvas = canvas;
    this.levelList = levelList;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.cardinalities = [];
    this.resize();
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const rect = this.canvas.getBoundingClientRect();
    this.canvas.width = Math.max(1, Math.round(rect.width * dpr));
    this.canvas.height = Math.max(1, Math.round(rect.height * dpr));
    this.col = Math.max(1, Math.round(COLUMN_PX * dpr));
    this.clear();
  }

  clear() {
    this.ctx.fillStyle = "#0b0f13";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
  }

  setLevels(cardinalities) {
    this.cardinalities = cardinalities;
    this.levelList.replaceChildren(...cardinalities.map((_, k) => {
      const li = document.createElement("li");
      li.textContent = cardinalities.length <= 16 || k % 2 === 0 ? `L${k}` : "";
      return li;
    }));
    this.clear();
  }

  push(codes) {
    const { ctx, canvas, col } = this;
    const k = codes.length;
    if (!k) return;
    ctx.drawImage(canvas, -col, 0); // scroll left by one column
    const x = canvas.width - col;
    for (let level = 0; level < k; level++) {
      const y0 = Math.round((level * canvas.height) / k);
      const y1 = Math.round(((level + 1) * canvas.height) / k);
      const card = this.cardinalities[level] || 1;
      ctx.fillStyle = PALETTE[Math.min(255, Math.floor((256 * codes[level]) / card))];
      // one device pixel of gap between levels keeps the bands readable
      ctx.fillRect(x, y0, col, Math.max(1, y1 - y0 - (k > 1 ? 1 : 0)));
    }
  }
}

const heatmap = new Heatmap($("heatmap"), $("levels"));

// -- view ------------------------------------------------------------------------------------------
let viewQueued = false;
function updateView() {
  if (viewQueued) return;
  viewQueued = true;
  requestAnimationFrame(() => {
    viewQueued = false;
    const m = state.model;
    $("frames").textContent = String(state.frames);
    $("streamtime").textContent = m ? `${(state.frames / m.frame_rate).toFixed(2)} s` : "0.00 s";
    const ms = (s) => (Number.isFinite(s) ? (1000 * s).toFixed(s < 0.01 ? 1 : 0) : "–");
    $("latency").textContent =
      `${ms(percentile(state.latencies, 0.5))} / ${ms(percentile(state.latencies, 0.95))} ms`;
    $("serverlat").textContent = `${ms(percentile(state.serverLatencies, 0.5))} ms`;
    const local = session && state.inputRate
      ? (1000 * session.fill) / state.inputRate + (session.ws ? session.ws.bufferedAmount / 4 / state.inputRate * 1000 : 0)
      : 0;
    const server = state.serverStats.backlog_frames;
    $("backlog").textContent = `${local.toFixed(0)} ms / ${server !== undefined ? `${server} fr` : "–"}`;
    const khz = (hz) => `${+(hz / 1000).toFixed(2)}`;
    $("rates").textContent = state.inputRate && m
      ? `${khz(state.inputRate)}→${khz(m.sample_rate)} kHz`
      : "–";
    $("packet").textContent = `${state.sendHintMs} ms`;
  });
}

function showModel(ready) {
  const m = ready.model;
  const levels = ready.outputs.codes;
  if (!levels && ready.outputs.units) {  // a units model: one row, one unit per frame
    heatmap.setLevels([m.units]);
    $("modelinfo").textContent = `${m.name} · ${m.frame_rate} frames/s · units (k=${m.units})` +
      ` · session ${ready.session}`;
    return;
  }
  const cards = m.levels.slice(0, levels).map((l) => l.cardinality);
  heatmap.setLevels(cards);
  $("modelinfo").textContent = `${m.name} · ${m.frame_rate} frames/s · ${levels} of ${m.levels.length} levels` +
    (cards.length ? ` · ${cards[0]} codes` : "") + ` · session ${ready.session}`;
}

function showFrame(frame) {
  const codes = frame.codes ? frame.codes.join(" ") : "";
  $("lastframe").textContent = `#${frame.index}  t=${frame.t.toFixed(2)} s  [${codes}]` +
    (frame.unit !== undefined ? `  unit ${frame.unit}` : "");
}

// -- session ---------------------------------------------------------------------------------------
function send(message) {
  session.ws.send(encode(message));
}

function sendAudio(samples) {
  let bytes;
  if (littleEndian) {
    bytes = new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength).slice();
  } else {
    bytes = new Uint8Array(samples.length * 4);
    const view = new DataView(bytes.buffer);
    samples.forEach((s, i) => view.setFloat32(4 * i, s, true));
  }
  state.samplesSent += samples.length;
  session.log.sent(state.samplesSent, performance.now() / 1000);
  send({ type: "audio", data: bytes });
}

function onCapture(chunk) {
  if (!session || state.status !== "streaming") return;
  const s = session;
  if (s.fill + chunk.length > s.buffer.length) { // grow (a hint larger than the buffer)
    const grown = new Float32Array(2 * (s.fill + chunk.length));
    grown.set(s.buffer.subarray(0, s.fill));
    s.buffer = grown;
  }
  s.buffer.set(chunk, s.fill);
  s.fill += chunk.length;
  const packet = Math.max(1, Math.round((state.sendHintMs * state.inputRate) / 1000));
  // Packets end on multiples of the packet size from the stream start, also after a hint
  // changes it (one shorter packet), so a frame-sized hint keeps packets on frame boundaries.
  let start = 0;
  for (;;) {
    const size = (Math.floor(state.samplesSent / packet) + 1) * packet - state.samplesSent;
    if (s.fill - start < size) break;
    sendAudio(s.buffer.subarray(start, start + size));
    start += size;
  }
  if (start) {
    s.buffer.copyWithin(0, start, s.fill);
    s.fill -= start;
  }
  updateView();
}

function onMessage(msg, now) {
  switch (msg.type) {
    case "ready":
      state.model = msg.model;
      state.outputs = msg.outputs;
      state.sendHintMs = msg.send_hint_ms;
      showModel(msg);
      setStatus("streaming");
      break;
    case "tokens": {
      const m = state.model;
      for (const frame of msg.frames) {
        const needed = Math.ceil((frame.index / m.frame_rate + m.delay_ms / 1000) * state.inputRate - 1e-9);
        const sent = session.log.completedAt(needed);
        if (sent !== null) pushWindow(state.latencies, now - sent);
        state.frames += 1;
        state.lastIndex = frame.index;
        if (frame.codes) heatmap.push(frame.codes);
        else if (frame.unit !== undefined && frame.unit !== null) heatmap.push([frame.unit]);
      }
      if (msg.timing) pushWindow(state.serverLatencies, msg.timing.sent - msg.timing.audio_complete);
      showFrame(msg.frames[msg.frames.length - 1]);
      break;
    }
    case "stats":
      state.serverStats = msg.values;
      break;
    case "hint":
      state.sendHintMs = msg.send_ms;
      break;
    case "flushed":
      state.lastFlushed = msg.last_frame;
      break;
    case "error":
      if (msg.fatal) {
        showError(`server: ${msg.code}: ${msg.message}`);
        setStatus("error");
      }
      else console.warn(`streamtok server warning: ${msg.code}: ${msg.message}`);
      break;
    default:
      break; // pong, and message types of newer servers
  }
  updateView();
}

function releaseAudio() {
  if (!session) return;
  const s = session;
  if (s.node) { s.node.port.postMessage("stop"); s.node.port.onmessage = null; s.node.disconnect(); }
  if (s.stream) for (const track of s.stream.getTracks()) track.stop();
  if (s.audio && s.audio.state !== "closed") s.audio.close().catch(() => {});
  s.node = s.stream = s.audio = null;
}

function onClose(event) {
  state.closeCode = event.code;
  state.stoppedAt = performance.now() / 1000;
  releaseAudio();
  if (state.status === "stopping" && event.code === 1000) {
    setStatus("stopped");
  } else if (state.status !== "error") { // a fatal `error` message already said why
    showError(`connection closed (code ${event.code}${event.reason ? `, ${event.reason}` : ""})`);
    setStatus("error");
  }
  session = null;
  updateView();
}

async function openAudio() {
  let audio = new AudioContext({ latencyHint: "interactive" });
  if (audio.sampleRate > 48000 || audio.sampleRate < 8000) { // the protocol's range
    await audio.close();
    audio = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  await audio.audioWorklet.addModule(new URL("./worklet.js", import.meta.url));
  const source = audio.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(audio, "streamtok-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { chunkFrames: Math.round(audio.sampleRate / 100) }, // 10 ms
  });
  node.onprocessorerror = () => showError("audio capture (AudioWorklet) failed");
  const mute = audio.createGain(); // a path to the destination keeps the node pulled
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(audio.destination);
  if (audio.state === "suspended") await audio.resume();
  return { audio, stream, node };
}

async function start() {
  Object.assign(state, {
    frames: 0, lastIndex: -1, samplesSent: 0, model: null, outputs: null, latencies: [],
    serverLatencies: [], serverStats: {}, lastFlushed: null, closeCode: null, errors: [],
    startedAt: performance.now() / 1000, stoppedAt: null,
  });
  $("error").hidden = true;
  $("lastframe").textContent = "–";
  setStatus("connecting");
  session = { ws: null, log: new SendLog(), buffer: new Float32Array(48000), fill: 0 };
  try {
    Object.assign(session, await openAudio());
  } catch (e) {
    releaseAudio();
    session = null;
    showError(`microphone: ${e.name === "NotAllowedError" ? "permission denied" : e.message || e}`);
    setStatus("error");
    return;
  }
  state.inputRate = session.audio.sampleRate;
  session.node.port.onmessage = (e) => onCapture(e.data);
  const codebooks = parseInt($("codebooks").value, 10);
  let ws;
  try {
    ws = new WebSocket(socketUrl());
  } catch (e) {
    releaseAudio();
    session = null;
    showError(`server address: ${e.message}`);
    setStatus("error");
    return;
  }
  ws.binaryType = "arraybuffer";
  session.ws = ws;
  ws.onopen = () => send({
    type: "start", version: PROTOCOL_VERSION, model: $("model").value.trim() || "default",
    sample_rate: state.inputRate, format: "f32le", channels: 1,
    // the model's own tokens (codes, or a units model's unit) unless a depth is picked
    outputs: codebooks > 0 ? { codes: codebooks } : { tokens: true }, client: "streamtok-browser/1",
  });
  ws.onmessage = (e) => onMessage(decode(e.data), performance.now() / 1000);
  ws.onclose = onClose;
}

function stop() {
  if (!session || state.status !== "streaming") return;
  setStatus("stopping");
  if (session.fill) { // the last partial packet; `end` pads the partial frame
    sendAudio(session.buffer.subarray(0, session.fill));
    session.fill = 0;
  }
  send({ type: "end" });
  session.log.closedAt = performance.now() / 1000;
  releaseAudio(); // the server now sends the last tokens, `flushed`, and closes with 1000
}

// -- wiring ----------------------------------------------------------------------------------------
$("server").value = params.get("server") || defaultServer();
if (params.get("model")) $("model").value = params.get("model");
if (params.get("codebooks")) $("codebooks").value = params.get("codebooks");
$("start").addEventListener("click", () => { start(); });
$("stop").addEventListener("click", stop);
window.addEventListener("resize", () => heatmap.resize());
setStatus("idle");
updateView();
