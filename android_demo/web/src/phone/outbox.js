// The update that left the encoder but has no answer yet. It is persisted before the first
// attempt, so a lost connection or a reload re-sends the same bytes and update_id (the
// server answers a repeat with "duplicate" and merges nothing twice). Each attempt is signed
// afresh (a new nonce) when the phone enrolled a key; 503/429 wait for Retry-After. A re-sent
// update may ask for the next check-in as the first attempt did: the duplicate's answer then
// carries it as well.

import { ServerError } from "./api.js";
import { Signer } from "./signing.js";

const ATTEMPTS = 6; // on 503/429, as the Python phone
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Outbox {
  constructor(api, store) {
    this.api = api;
    this.store = store;
    this.pending = null; // { body, meta, before (residual to roll back to), attempts }
    this.signer = null;
  }

  async restore() {
    this.pending = (await this.store.get("pending")) ?? null;
  }

  async put(pending) {
    this.pending = pending;
    await this.store.set("pending", pending);
  }

  async drop() {
    this.pending = null;
    await this.store.delete("pending");
  }

  /**
   * POST the pending update: { answer, next, nextError } (Api.update; `checkin` are its chain,
   * inlineModel and params options), or ServerError / NetworkError.
   */
  async send(identity, checkin = {}) {
    const p = this.pending;
    p.attempts += 1;
    await this.store.set("pending", p);
    for (let attempt = 0; ; attempt++) {
      const headers = { "Content-Type": "application/octet-stream" };
      if (identity.key) {
        this.signer ??= new Signer(identity.key);
        Object.assign(headers, await this.signer.headers(identity.phoneId, p.meta.base_version, p.meta.update_id, p.body));
      }
      try {
        return await this.api.update(p.body, { ...checkin, headers });
      } catch (err) {
        if (!(err instanceof ServerError && [429, 503].includes(err.status)) || attempt === ATTEMPTS - 1) throw err;
        await sleep(1000 * (err.retryAfter ?? 1));
      }
    }
  }
}
