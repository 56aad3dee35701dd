// The web phone's protocol loop, as device_runtime/protocol_client.py's ProtocolClient: register, check in,
// download the model, train locally (WASM), encode the update (FORMAT.md section 6), upload.
// Check-ins ask for the model inside a "train" answer (FORMAT.md section 9): when the server
// sends it that way, the task comes in the model message's meta and there is no download. Uploads
// ask for the next check-in too (`?checkin=`, same section): its answer comes with the upload's,
// so after the first check-in a task costs one request.
//
// Differences that come from living in a browser tab: the bundle's graphs are downloaded and
// verified here; what must survive a reload (identity, residual, ledger, an unacknowledged
// upload) is in IndexedDB; and an upload lost to the network is retried later with the same
// bytes and update_id (the server is idempotent on (phone, update_id)) instead of being
// retrained. The DOM is not touched here: `onChange(state)` reports every change.
//
// A registration carries the model fingerprint of the bundle the phone holds (its manifest's
// model_fingerprint, export/manifest.py), kept from an earlier download: a server whose task is
// another model refuses it (409 model_mismatch), and the phone stops with that error rather than
// train a model that is not the server's. A phone with no bundle yet has nothing to send; the
// bundle it then downloads is the server's own (the server checks it against the task at start).
//
// A model with batch norm statistics (FORMAT.md section 11, model_state.js) trains from the state
// the model message carries (shared) or from the phone's own (local: kept in IndexedDB across
// reloads), and every update carries the state its training ended with.

import { UpdateEncoder } from "../codec/encoder.js";
import { localEpsilon } from "../codec/privacy.js";
import { CryptoRandom } from "../codec/rng.js";
import { float } from "../wire/canonical.js";
import { NetworkError, ServerError, decodeModel, latestRound, waitForNetwork } from "./api.js";
import { cachedBundle, downloadBundle } from "./bundle.js";
import { tensorData } from "./data.js";
import { completeState, loadOwnState, modelTensors, saveOwnState, splitModel, stateList } from "./model_state.js";
import { recall, remember } from "./offline.js";
import { Outbox } from "./outbox.js";
import { newSigningKey, publicKeyB64 } from "./signing.js";
import { WasmTrainer } from "./trainer.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const MAX_ERRORS = 20;

export class WebPhone {
  constructor({ api, store, name, examples, sign = true, inlineModel = true, chainCheckin = true, onChange = () => {},
    log = () => {} }) {
    Object.assign(this, { api, store, name, examples, sign, inlineModel, chainCheckin, onChange, log });
    this.rng = new CryptoRandom();
    this.running = false;
    this.identity = null; // { phoneId, token, counter, key }
    this.task = null;
    this.model = null; // { version, params: Map name -> Float32Array, state: Map buffer -> typed array, or null }
    this.ownState = null; // local state mode: the running statistics this phone's last training left (Map)
    this.inlineTask = null; // the check-in answer whose model came inside it (this.model)
    this.next = null; // the next check-in's answer, when it came with the last upload's ({ answer, model, body })
    this.encoder = null;
    this.codecKey = null;
    this.outbox = new Outbox(api, store); // an encoded update not yet acknowledged
    this.ledger = []; // [{ mechanism, z, count }]: local-DP releases that left this phone
    this.bundleManifest = null; // manifest.json of the bundle this phone holds (its model fingerprint)
    this.state = {
      phase: "idle", phoneId: null, mode: null, signed: false, version: null, round: null, tasks: 0, accepted: 0,
      duplicates: 0, rejected: 0, networkRetries: 0, loss: null, localAccuracy: null, serverAccuracy: null,
      serverVersion: null, updateBytes: 0, lastUpdateBytes: null, bytesUp: 0, bytesDown: 0, epsilon: null,
      inlineModels: 0, modelDownloads: 0, // task models that came inside a check-in's answer; GET /v1/model requests
      checkins: 0, chainedCheckins: 0, // check-in answers acted on; of those, the ones that came with an upload
      delta: null, epsilonSource: "phone's RDP ledger (dp_accounting's formula, computed in JS)", lastUpload: null,
      uploads: [], stepMs: null, bundleBytes: null, examples: examples.length, error: null,
      stateMode: null, stateFrom: null, // a model with state: "shared" | "local"; where the last task's started ("server" | "phone" | "bundle")
    };
  }

  set(changes) {
    Object.assign(this.state, changes, { bytesUp: this.api.bytesUp, bytesDown: this.api.bytesDown });
    this.onChange(this.state);
  }

  async start() {
    this.running = true;
    await this.restore();
    await this.loadOffline();
    await this.run();
  }

  /** The last task, bundle and model kept on the phone: predictions work before any network. */
  async loadOffline() {
    this.task = (await this.store.get("task")) ?? null;
    if (!this.task) return;
    this.set({ mode: this.task.mode, delta: this.task.dp_delta, stateMode: this.task.state_mode ?? null });
    try {
      const bundle = await cachedBundle(this.task);
      if (bundle) {
        this.trainer = await WasmTrainer.create(bundle.files, bundle.manifest);
        this.bundleManifest = bundle.manifest;
        this.ownState = await loadOwnState(this.store, this.trainer.stateSpec);
      }
      const body = await recall("/v1/model");
      if (body) this.model = this.decodeModel(body);
    } catch (err) {
      this.log(`offline copies not usable (${err.message}); waiting for the network`);
    }
    this.set({ version: this.model?.version ?? null });
  }

  /** Whatever is missing of task, registration and a fresh verified bundle (needs the network). */
  async ensureReady() {
    if (!this.taskFresh) {
      this.task = await this.api.json("GET", "/v1/task");
      await this.store.set("task", this.task);
      this.taskFresh = true;
      this.set({ mode: this.task.mode, delta: this.task.dp_delta, stateMode: this.task.state_mode ?? null });
    }
    if (!this.identity) await this.register();
    if (!this.bundleFresh) {
      this.set({ phase: "bundle" });
      const bundle = await downloadBundle(this.api, this.task);
      this.trainer = await WasmTrainer.create(bundle.files, bundle.manifest);
      this.bundleManifest = bundle.manifest;
      this.ownState = await loadOwnState(this.store, this.trainer.stateSpec);
      this.bundleFresh = true;
      this.set({ bundleBytes: bundle.bytes });
    }
  }

  stop() {
    this.running = false;
  }

  async restore() {
    this.identity = (await this.store.get("identity")) ?? null;
    await this.outbox.restore();
    this.ledger = (await this.store.get("ledger")) ?? [];
    const saved = await this.store.get("encoder");
    if (saved) [this.codecKey, this.savedEncoderState] = [saved.codec, saved.state];
    if (this.identity) this.api.token = this.identity.token;
    this.set({ phoneId: this.identity?.phoneId ?? null, signed: Boolean(this.identity?.key), uploads: (await this.store.get("uploads")) ?? [] });
  }

  async register() {
    this.set({ phase: "registering" });
    const key = this.sign ? await newSigningKey() : null;
    const enrol = { name: this.name, platform: "web", runtime: "onnxruntime-web" };
    if (key) enrol.public_key = await publicKeyB64(key);
    const fingerprint = this.bundleManifest?.model_fingerprint;
    if (fingerprint) enrol.model_fingerprint = fingerprint; // the model this phone holds
    this.api.token = "";
    let answer;
    try {
      answer = await this.api.json("POST", "/v1/register", enrol);
    } catch (err) {
      if (!(err instanceof ServerError && err.reason === "name_taken")) throw err;
      enrol.name = `${this.name}-${Math.floor(this.rng.random() * 1e6)}`; // another browser holds that name
      answer = await this.api.json("POST", "/v1/register", enrol);
    }
    this.identity = { phoneId: answer.phone_id, token: answer.token, counter: 0, key };
    this.api.token = answer.token;
    await this.store.set("identity", this.identity);
    this.set({ phoneId: answer.phone_id, signed: Boolean(key) });
    this.log(`registered as ${answer.phone_id}${key ? " with an Ed25519 key" : " (unsigned)"}`);
  }

  /** Check in until the server says the task is done; network losses wait and retry. */
  async run() {
    let backoff = 500;
    let errors = 0;
    while (this.running) {
      try {
        await this.ensureReady();
        await this.flushPending();
        if ((await this.step()) === "done") break;
        backoff = 500;
      } catch (err) {
        if (err instanceof NetworkError) {
          this.set({ phase: "offline" });
          this.log(`network lost (${err.message}); retrying`);
          await waitForNetwork(backoff);
          backoff = Math.min(2 * backoff, 10000);
          continue;
        }
        if (err instanceof ServerError && err.reason === "model_mismatch") {
          this.running = false; // the bundle this phone holds is for another model: stop, say why
          this.set({ error: err.message });
          this.log(`refused: ${err.message}`);
          break;
        }
        if (err instanceof ServerError && err.reason === "unknown_phone") {
          this.log("the server does not know this phone any more: registering again");
          await this.forget(); // ensureReady registers on the next turn
          continue;
        }
        errors++;
        this.set({ error: err.message });
        this.log(`error: ${err.message}`);
        if (errors > MAX_ERRORS) throw err;
        await sleep(err.retryAfter ? err.retryAfter * 1000 : backoff);
        backoff = Math.min(2 * backoff, 10000);
      }
    }
    for (let i = 0; i < 20 && this.state.serverVersion !== this.state.version; i++) {
      await this.refreshServerAccuracy(); // the final version's evaluation may still be running
      await sleep(250);
    }
    this.set({ phase: this.running ? "finished" : "stopped" });
  }

  async forget() {
    this.identity = null;
    this.next = null;
    await this.store.delete("identity");
    await this.outbox.drop();
  }

  async step() {
    this.set({ phase: "checking in" });
    const answer = await this.checkin();
    if (answer.action === "wait") {
      this.set({ phase: "waiting" });
      await sleep(1000 * Number(answer.retry_after_s ?? 1));
    } else if (answer.action === "train" && answer.train?.secure_agg) {
      // secure rounds mask updates with SecAgg+ (docs/secure-aggregation.md), which this phone lacks
      const why = "this server runs secure aggregation, which the web phone does not implement";
      this.set({ phase: "stopped", error: why });
      this.log(why);
      return "done";
    } else if (answer.action === "train") {
      await this.trainAndUpload(answer);
    } else if (answer.action === "done" && Number.isInteger(answer.version)) {
      await this.download(answer.version); // keep the final model for predictions, also offline
      this.set({ version: answer.version });
    }
    this.refreshServerAccuracy();
    return answer.action;
  }

  /**
   * The answer the last upload brought, or else POST /v1/checkin. Asking for the model inline, the
   * answer is JSON (wait, done, or a task whose model is over the server's limit) or, by its
   * Content-Type, the task's model message with the task under meta.task: that model is checked
   * like a downloaded one, kept (also offline) as if downloaded, and trainAndUpload uses it
   * without a GET /v1/model.
   */
  async checkin() {
    const chained = this.next !== null;
    const { answer, model, body } = this.next
      ?? await this.api.checkin({ inlineModel: this.inlineModel, params: modelTensors(this.task) });
    this.next = null;
    this.set({ checkins: this.state.checkins + 1, chainedCheckins: this.state.chainedCheckins + (chained ? 1 : 0) });
    if (model) {
      this.model = { version: model.version, ...splitModel(model.params) };
      this.inlineTask = answer;
      await remember("/v1/model", body);
      this.set({ inlineModels: this.state.inlineModels + 1 });
    }
    return answer;
  }

  /** The model of `version` (?version= keeps base_version exact); a cached copy revalidates with its ETag. */
  async download(version) {
    const headers = this.model?.version === version ? { "If-None-Match": `"v${version}"` } : {};
    const { status, data } = await this.api.request("GET", `/v1/model?version=${version}`, { headers });
    this.set({ modelDownloads: this.state.modelDownloads + 1 });
    if (status === 304) return this.model.params;
    this.model = this.decodeModel(data);
    await remember("/v1/model", data);
    return this.model.params;
  }

  /** A model message checked against the task's tensors: { version, params: Map name -> Float32Array, state }. */
  decodeModel(body) {
    const { version, params } = decodeModel(body, modelTensors(this.task));
    return { version, ...splitModel(params) };
  }

  /**
   * The running statistics a task of model `model` starts from (null: a model without), and where
   * they come from: the model message's (shared), or this phone's own (local); a buffer neither
   * holds starts from the bundle's initial value (weights.safetensors), as on the Python phones.
   */
  startState(model) {
    const spec = this.trainer.stateSpec;
    if (!spec.length) return { state: null, from: null };
    const given = this.task.state_mode === "shared" ? model?.state ?? null : this.ownState;
    const from = !given ? "bundle" : this.task.state_mode === "shared" ? "server" : "phone";
    return { state: completeState(given, spec, this.trainer.initialState), from };
  }

  /** The most likely class of one example, by the phone's model and the statistics it would train from. */
  async predict(x) {
    return this.trainer.predict(this.model.params, x, this.startState(this.model).state);
  }

  async trainAndUpload(task) {
    const version = task.version;
    const inline = task === this.inlineTask && this.model?.version === version; // the model came with the task
    this.inlineTask = null;
    this.set({ phase: inline ? "training" : "downloading", round: task.round });
    const params = inline ? this.model.params : await this.download(version);
    const start = this.startState(this.model);
    this.set({ phase: "training", version, stateFrom: start.from });
    const data = tensorData(this.examples);
    const result = await this.trainer.train(params, data, task.train, this.rng, start.state);
    const evalResult = await this.trainer.evaluate(result.params, data, result.state);
    const delta = this.task.params.map(({ name, shape }) => {
      const before = params.get(name);
      return { name, shape, data: result.params.get(name).map((w, i) => w - before[i]) }; // Float32Array: rounded like numpy's
    });
    this.set({ loss: result.loss, localAccuracy: evalResult.accuracy, stepMs: this.trainer.stepStats(), tasks: this.state.tasks + 1 });
    const encoder = await this.encoderFor(task.train.codec ?? {});
    this.identity.counter += 1;
    const meta = {
      update_id: `${this.identity.phoneId}-${this.identity.counter}`, base_version: version,
      num_examples: result.examples, train_loss: float(result.loss), round: task.round,
    };
    const base = encoder.residualBaseVersion;
    const before = encoder.state();
    const state = stateList(result.state, this.trainer.stateSpec); // sent as it is, never encoded as the update
    const body = await encoder.encode(delta, meta, { staleness: base === null ? 0 : Math.max(version - base, 0), state });
    const release = encoder.release();
    if (release) this.charge(release); // spent once it leaves, whatever happens next
    await this.store.set("identity", this.identity);
    await this.store.set("encoder", { codec: this.codecKey, state: encoder.state() });
    await this.store.set("ledger", this.ledger);
    if (this.task.state_mode === "local" && state.length) {
      this.ownState = result.state; // the next task starts from it, also after a reload
      await saveOwnState(this.store, this.ownState);
    }
    await this.outbox.put({ body, meta, before, attempts: 0 });
    await this.flushPending();
  }

  /** The encoder the task asks for; kept across tasks (and reloads) for its residual. */
  async encoderFor(codec) {
    const key = JSON.stringify(codec);
    if (this.encoder && key === this.codecKey) return this.encoder;
    this.encoder = new UpdateEncoder(codec, this.rng);
    if (key === this.codecKey && this.savedEncoderState) this.encoder.load(this.savedEncoderState);
    this.codecKey = key;
    return this.encoder;
  }

  charge({ mechanism, z }) {
    const row = this.ledger.find((r) => r.mechanism === mechanism && r.z === z);
    if (row) row.count += 1;
    else this.ledger.push({ mechanism, z, count: 1 });
    this.set({ epsilon: localEpsilon(this.ledger, this.task.dp_delta) });
  }

  /** Upload the pending update, if any. Network loss keeps it for later; a refusal drops it. */
  async flushPending() {
    const p = this.outbox.pending;
    if (!p) return;
    this.set({ phase: "uploading" });
    const record = { updateId: p.meta.update_id, round: p.meta.round, baseVersion: p.meta.base_version, bytes: p.body.length };
    const checkin = { chain: this.chainCheckin, inlineModel: this.inlineModel, params: modelTensors(this.task) };
    let answer;
    let next;
    let nextError;
    try {
      ({ answer, next, nextError } = await this.outbox.send(this.identity, checkin));
    } catch (err) {
      if (err instanceof NetworkError) {
        this.recordUpload({ ...record, status: "pending", attempts: p.attempts });
        this.set({ networkRetries: this.state.networkRetries + 1 });
        throw err;
      }
      if (err instanceof ServerError && [400, 409, 413].includes(err.status)) {
        this.rollback(p);
        await this.settle();
        this.recordUpload({ ...record, status: `rejected: ${err.reason}`, attempts: p.attempts });
        this.set({ rejected: this.state.rejected + 1 });
        return;
      }
      throw err;
    }
    await this.settle();
    this.next = next; // step() acts on it instead of checking in
    if (nextError) this.log(`the check-in that came with the upload was unusable (${nextError.message}); checking in anew`);
    this.recordUpload({ ...record, status: answer.duplicate ? "duplicate" : "accepted", attempts: p.attempts });
    this.set({
      accepted: this.state.accepted + 1, duplicates: this.state.duplicates + (answer.duplicate ? 1 : 0),
      updateBytes: this.state.updateBytes + p.body.length, lastUpdateBytes: p.body.length,
    });
    this.log(`update ${p.meta.update_id} (${p.body.length} bytes) ${answer.duplicate ? "was already received" : "accepted"}`);
  }

  /** Nothing was merged: the residual goes back to what it was before this update. */
  rollback(p) {
    if (!p.before) return;
    if (this.encoder) this.encoder.load(p.before);
    else this.savedEncoderState = p.before; // restored after a reload, before any task built the encoder
  }

  /** The pending update is answered: drop it and keep the residual as it now stands. */
  async settle() {
    await this.outbox.drop();
    const state = this.encoder ? this.encoder.state() : this.savedEncoderState;
    if (this.codecKey !== null) await this.store.set("encoder", { codec: this.codecKey, state });
  }

  recordUpload(row) {
    const uploads = this.state.uploads.filter((u) => u.updateId !== row.updateId).concat([row]).slice(-50);
    this.set({ uploads, lastUpload: row });
    this.store.set("uploads", uploads);
  }

  /** The server's held-out accuracy of its newest version (not phone traffic: GET /v1/rounds). */
  async refreshServerAccuracy() {
    const last = await latestRound(this.api.base, this.state.round ?? 0);
    if (last) this.set({ serverAccuracy: last.accuracy, serverVersion: last.version });
  }
}
