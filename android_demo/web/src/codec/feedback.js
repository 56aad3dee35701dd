// Error feedback: what an update did not deliver is kept and added to the next one.
//
// EF-SGD (Stich et al., 2018, "Sparsified SGD with Memory"; Karimireddy et al., 2019): with
// corrected = delta + decay^staleness * residual, the phone sends C(corrected) and keeps
// residual = corrected - decoded(C(corrected)) in binary64. The residual only ever holds
// post-noise values, so keeping it costs no privacy. It must survive a reload: `state()` and
// `ErrorFeedback.from(state)` give plain data for IndexedDB (protocol/codec/feedback.py).

export class ErrorFeedback {
  constructor(decay = 1.0) {
    this.decay = decay;
    this.residual = new Map(); // name -> { shape, data: Float64Array }
    this.baseVersion = null; // model version the residual was made against
  }

  /** corrected = update + decay^staleness * residual, for tensors of the same shape. */
  addTo(update, staleness) {
    const factor = this.decay ** staleness;
    return update.map((t) => {
      const r = this.residual.get(t.name);
      if (!r || !factor || r.shape.join() !== t.shape.join() || r.shape.length !== t.shape.length) return t;
      return { ...t, data: t.data.map((x, i) => x + factor * r.data[i]) };
    });
  }

  /** residual = corrected - what the server will decode (`sent[i]` at `picks[i].indices`). */
  keep(corrected, picks, sent) {
    const residual = new Map();
    corrected.forEach((t, n) => {
      const r = Float64Array.from(t.data);
      const { indices } = picks[n];
      if (indices === null) sent[n].forEach((v, i) => { r[i] -= v; });
      else indices.forEach((idx, k) => { r[idx] -= sent[n][k]; });
      residual.set(t.name, { shape: [...t.shape], data: r });
    });
    this.residual = residual;
  }

  state() {
    const residual = [...this.residual].map(([name, r]) => ({ name, shape: r.shape, data: Float64Array.from(r.data) }));
    return { baseVersion: this.baseVersion, residual };
  }

  load(state) {
    const residual = new Map();
    for (const { name, shape, data } of state.residual ?? []) {
      if (!data.every(Number.isFinite)) throw new RangeError(`residual ${name} holds NaN or Inf`);
      residual.set(name, { shape: [...shape], data: Float64Array.from(data) });
    }
    this.residual = residual;
    this.baseVersion = Number.isInteger(state.baseVersion) ? state.baseVersion : null;
  }
}
