// The page: wires the WebPhone to the DOM, the drawing pad and the service worker.
//
// URL parameters (all optional): name=NAME (the phone's name at registration), phone=ID (a
// separate identity, i.e. IndexedDB database, for several phones in one browser profile),
// shard=I/N (hold every N-th bundled sample digit from the I-th), autostart=1, inline=0 (check-ins
// do not ask for the model inside the answer: it always comes from GET /v1/model), chain=0 (uploads
// do not ask for the next check-in: every task starts with its own POST /v1/checkin).

import { Api } from "./api.js";
import { digitFromCanvas, drawDigit, loadSamples } from "./data.js";
import { WebPhone } from "./phone.js";
import { PhoneStore } from "./store.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 50) $("log").lastChild.remove();
}

function render(s) {
  document.body.dataset.phase = s.phase;
  $("phase").textContent = s.phase;
  $("phone-id").textContent = s.phoneId ?? "–";
  $("mode").textContent = s.mode ?? "–";
  $("version").textContent = s.version ?? "–";
  $("round").textContent = s.round ?? "–";
  $("loss").textContent = fmt(s.loss);
  $("local-accuracy").textContent = fmt(s.localAccuracy, 3);
  $("server-accuracy").textContent = s.serverAccuracy === null ? "–" : `${fmt(s.serverAccuracy, 3)} (v${s.serverVersion})`;
  $("update-bytes").textContent = s.lastUpdateBytes === null ? "–" : `${s.updateBytes} B (last ${s.lastUpdateBytes} B)`;
  $("epsilon").textContent = s.epsilon === null ? "no local DP" : `${fmt(s.epsilon, 3)} at δ=${s.delta}`;
  $("epsilon-note").textContent = s.epsilon === null ? "" : `ε: ${s.epsilonSource}.`;
  const up = s.lastUpload;
  $("last-upload").textContent = up ? `${up.status} (r${up.round}, ${up.bytes} B${up.attempts > 1 ? `, ${up.attempts} tries` : ""})` : "–";
  $("step-ms").textContent = s.stepMs ? `${fmt(s.stepMs.medianMs, 2)} ms` : "–";
  $("examples").textContent = s.examples;
  $("signed").textContent = s.phoneId ? (s.signed ? "uploads signed with Ed25519" : "uploads unsigned") : "";
}

function setupPad(phone, store, drawn) {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  ctx.lineWidth = 16;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#1b2733";
  let drawing = false;
  const at = (e) => [e.offsetX * (pad.width / pad.clientWidth), e.offsetY * (pad.height / pad.clientHeight)];
  pad.addEventListener("pointerdown", (e) => {
    drawing = true;
    pad.setPointerCapture(e.pointerId);
    ctx.beginPath();
    ctx.moveTo(...at(e));
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.lineTo(...at(e));
    ctx.stroke();
  });
  pad.addEventListener("pointerup", async () => {
    drawing = false;
    const pixels = digitFromCanvas(pad);
    if (!pixels) return;
    drawDigit($("preview"), pixels);
    if (phone.trainer && phone.model) {
      try {
        const guess = await phone.predict(Float32Array.from(pixels, (v) => v / 16));
        $("prediction").textContent = `model v${phone.model.version} says ${guess}`;
      } catch (err) {
        log(`could not predict: ${err.message}`);
      }
    }
  });
  const clear = () => {
    ctx.clearRect(0, 0, pad.width, pad.height);
    $("preview").getContext("2d").clearRect(0, 0, 64, 64);
    $("prediction").textContent = "draw a digit";
  };
  $("clear").onclick = clear;
  for (let d = 0; d < 10; d++) $("label").append(new Option(String(d), String(d)));
  $("add").onclick = async () => {
    const pixels = digitFromCanvas(pad);
    if (!pixels) return log("draw a digit first");
    const example = { pixels, label: Number($("label").value), source: "drawn" };
    phone.examples.push(example); // trained on from the next task
    drawn.push(example);
    await store.set("drawn", drawn);
    phone.set({ examples: phone.examples.length });
    log(`added a drawn ${example.label}: ${phone.examples.length} examples on this phone`);
    clear();
  };
}

async function start(phone) {
  $("start").disabled = true;
  try {
    await phone.start();
  } catch (err) {
    phone.set({ phase: "error", error: err.message });
    log(`stopped: ${err.message}`);
    $("start").disabled = false;
  }
}

async function main() {
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js").catch((err) => log(`offline cache unavailable: ${err.message}`));
  }
  const id = params.get("phone");
  const store = await PhoneStore.open(id ? `fedfleet-phone-${id}` : "fedfleet-phone");
  const [shard, of] = (params.get("shard") ?? "0/1").split("/").map(Number);
  const drawn = (await store.get("drawn")) ?? [];
  const examples = [...(await loadSamples("data/samples.json", { shard, of })), ...drawn];
  const name = params.get("name") ?? `web-${crypto.randomUUID().slice(0, 8)}`;
  const inlineModel = params.get("inline") !== "0";
  const chainCheckin = params.get("chain") !== "0";
  const phone = new WebPhone({ api: new Api(), store, name, examples, inlineModel, chainCheckin, onChange: render, log });
  window.fedfleet = { phone, snapshot: () => JSON.parse(JSON.stringify(phone.state)) };
  render(phone.state);
  setupPad(phone, store, drawn);
  $("start").onclick = () => start(phone);
  document.body.dataset.ready = "1";
  if (params.get("autostart") === "1") start(phone);
}

main().catch((err) => log(`failed to start: ${err.message}`));
