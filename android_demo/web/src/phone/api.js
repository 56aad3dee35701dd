// The phone's HTTP client for the fedfleet API (README "HTTP API"): JSON for control, wire
// messages for tensors, `Authorization: Bearer TOKEN` once registered. Failures are data:
// ServerError carries the server's status, JSON `error` reason and Retry-After; NetworkError
// means the request (or its answer) was lost and may be retried.

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
