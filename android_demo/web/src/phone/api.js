// The phone's HTTP client for the fedfleet API (docs/http-api.md): JSON for control, wire
// messages for tensors, `Authorization: Bearer TOKEN` once registered. Failures are data:
// ServerError carries the server's status, JSON `error` reason and Retry-After; NetworkError
// means the request (or its answer) was lost and may be retried.

import { decodeMessage } from "../wire/wire.js";

export class ServerError extends Error {
  constructor(status, reason, message, retryAfter = null) {
    super(`${status} ${reason}: ${message}`);
    this.status = status;
    this.reason = reason;
    this.retryAfter = retryAfter;
  }
}

export class NetworkError extends Error {}

export class Api {
  constructor(base = location.origin) {
    this.base = base.replace(/\/$/, "");
    this.token = "";
    this.bytesUp = 0; // request bodies sent, as the server counts them
    this.bytesDown = 0; // response bodies received
  }

  /** fetch with the token; returns the Response (2xx or 304) or throws ServerError/NetworkError. */
  async request(method, path, { json, body, headers = {} } = {}) {
    const h = { ...headers };
    if (this.token) h.Authorization = `Bearer ${this.token}`;
    let payload = body;
    if (json !== undefined) {
      payload = new TextEncoder().encode(JSON.stringify(json));
      h["Content-Type"] = "application/json";
    }
    let resp;
    let data;
    try {
      resp = await fetch(this.base + path, { method, headers: h, body: payload, cache: "no-store" });
      data = new Uint8Array(await resp.arrayBuffer());
    } catch (err) {
      throw new NetworkError(`${method} ${path}: ${err.message}`);
    }
    this.bytesUp += payload ? payload.byteLength : 0;
    this.bytesDown += data.length;
    if (resp.status >= 400) throw serverError(resp, data);
    return { status: resp.status, headers: resp.headers, data };
  }

  /** A JSON answer; POST sends `body` (default {}), GET sends nothing. */
  async json(method, path, body = {}) {
    const { data } = await this.request(method, path, method === "GET" ? {} : { json: body });
    return JSON.parse(new TextDecoder().decode(data));
  }

  /**
   * POST /v1/checkin: { answer, model, body }. With `inlineModel` the phone asks for the model
   * inside a "train" answer (FORMAT.md section 9); the server may then answer, by Content-Type,
   * with the task's model message whose meta carries the task under "task". That message is
   * checked as a downloaded one (decodeModel against the task's `params`) and the task must be a
   * train task for its version: `answer` is then that task, `model` the decoded model and `body`
   * its bytes. Every other answer is JSON, with `model` and `body` null.
   */
  async checkin({ inlineModel = false, params = null } = {}) {
    const json = inlineModel ? { inline_model: true } : {};
    const { headers, data } = await this.request("POST", "/v1/checkin", { json });
    return checkinAnswer(headers, data, { inlineModel, params });
  }

  /**
   * POST /v1/update: { answer, next, nextError }, `answer` the upload's own JSON answer. With `chain` the
   * phone asks for its next check-in in the same request (`?checkin=inline` or `json`, as
   * `inlineModel` says; FORMAT.md section 9, "The next check-in with the upload"): when the
   * server made it (header X-Fedfleet-Checkin: 1) the body is that check-in's answer, read as
   * `checkin` reads one, and the upload's answer is in the header X-Fedfleet-Update. `next` is
   * then { answer, model, body } as from `checkin`; it is null when the server answered the
   * upload alone, or when the check-in part is unusable (`nextError` says why): the update was
   * accepted all the same, and the phone checks in anew.
   */
  async update(body, { headers = {}, chain = false, inlineModel = false, params = null } = {}) {
    const path = chain ? `/v1/update?checkin=${inlineModel ? "inline" : "json"}` : "/v1/update";
    const resp = await this.request("POST", path, { body, headers });
    if (!chain || resp.headers.get("X-Fedfleet-Checkin") !== "1") {
      return { answer: JSON.parse(new TextDecoder().decode(resp.data)), next: null, nextError: null };
    }
    const ack = resp.headers.get("X-Fedfleet-Update");
    if (ack === null) throw new Error("an upload answered with a check-in must carry its own answer in X-Fedfleet-Update");
    const answer = JSON.parse(ack);
    try {
      return { answer, next: checkinAnswer(resp.headers, resp.data, { inlineModel, params }), nextError: null };
    } catch (err) {
      return { answer, next: null, nextError: err };
    }
  }
}

/** A check-in's answer (see Api.checkin): JSON, or (asked for inline) the task's model message. */
function checkinAnswer(headers, data, { inlineModel, params }) {
  if (!inlineModel || !(headers.get("Content-Type") ?? "").startsWith("application/octet-stream")) {
    const answer = JSON.parse(new TextDecoder().decode(data));
    if (answer === null || typeof answer !== "object" || typeof answer.action !== "string") {
      throw new Error("a check-in answer must be a JSON object with an action");
    }
    return { answer, model: null, body: null };
  }
  const model = decodeModel(data, params);
  const task = model.meta.task;
  if (task === null || typeof task !== "object" || task.action !== "train" || task.version !== model.version) {
    throw new Error(`the check-in's model message (version ${model.version}) must carry the train task for its version`);
  }
  return { answer: task, model, body: data };
}

/**
 * A model message checked against the task's tensors (`params`: [{ name, shape, dtype }]), of kind
 * "model" with an integer meta.version: { version, params: Map name -> Float32Array, meta }.
 */
export function decodeModel(body, params) {
  const expected = new Map(params.map((p) => [p.name, { shape: p.shape, dtype: p.dtype }]));
  const message = decodeMessage(body, { expected });
  if (message.kind !== "model" || !Number.isInteger(message.meta.version)) {
    throw new Error("the model message must be of kind 'model' with an integer meta.version");
  }
  const tensors = new Map([...message.tensors].map(([name, t]) => [name, t.data]));
  return { version: message.meta.version, params: tensors, meta: message.meta };
}

function serverError(resp, data) {
  const retry = Number(resp.headers.get("Retry-After"));
  let reason = "http";
  let message = new TextDecoder().decode(data.subarray(0, 200));
  try {
    const answer = JSON.parse(new TextDecoder().decode(data));
    reason = String(answer.error);
    message = String(answer.message);
  } catch {
    // not JSON: keep the start of the body
  }
  return new ServerError(resp.status, reason, message, Number.isFinite(retry) && retry > 0 ? retry : null);
}

/** Resolve when the browser is back online, or after `ms` (navigator.onLine can lag behind). */
export function waitForNetwork(ms) {
  const sleep = () => new Promise((resolve) => setTimeout(resolve, ms));
  if (typeof navigator === "undefined" || navigator.onLine) return sleep();
  return new Promise((resolve) => {
    const done = () => {
      removeEventListener("online", done);
      resolve();
    };
    addEventListener("online", done);
    setTimeout(done, Math.max(ms, 5000));
  });
}

/** The newest round record after round `since` (GET /v1/rounds), or null (none yet, or offline). */
export async function latestRound(base, since) {
  try {
    const answer = await (await fetch(`${base}/v1/rounds?since=${Math.max(0, since - 1)}`, { cache: "no-store" })).json();
    return answer.rounds.at(-1) ?? null;
  } catch {
    return null;
  }
}
