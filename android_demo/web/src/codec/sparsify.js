// Step 3: sparsification, per tensor: keep k of n entries, sent with their indices
// (protocol/codec/sparsify.py).
//
// * top-k keeps the k largest |x| (Aji & Heafield, 2017; Stich et al., 2018); among equal
//   magnitudes the lower index wins, so every language picks the same entries. Biased, which
//   error feedback repairs.
// * rand-k keeps k uniformly random entries, scaled by n/k so the send is unbiased (Stich et
//   al., 2018; Konecny et al., 2016).
//
// A pick is { indices: sorted array | null (all of it), values: Float64Array in index order }.

import { randint } from "./rng.js";

/** k = min(k, n), or max(1, floor(density * n + 1/2)) capped at n (0 if n = 0). */
export function keepCount(n, density, k) {
  if (n === 0) return 0;
  if (k !== null) return Math.min(k, n);
  return Math.min(n, Math.max(1, Math.floor(density * n + 0.5)));
}

/** Sorted indices of the k largest |values|; among equal magnitudes, the lower index first. */
export function topKIndices(values, k) {
  const order = Array.from(values.keys());
  order.sort((a, b) => Math.abs(values[b]) - Math.abs(values[a]) || a - b);
  return order.slice(0, k).sort((a, b) => a - b);
}

export function topK(update, { density, k }) {
  return update.map(({ data }) => {
    const indices = topKIndices(data, keepCount(data.length, density, k));
    return { indices, values: Float64Array.from(indices, (i) => data[i]) };
  });
}

/** k distinct indices, uniformly (a partial Fisher-Yates shuffle), then sorted. */
function sampleIndices(n, k, rng) {
  const pool = Array.from({ length: n }, (_, i) => i);
  for (let i = 0; i < k; i++) {
    const j = i + randint(rng, n - i);
    [pool[i], pool[j]] = [pool[j], pool[i]];
  }
  return pool.slice(0, k).sort((a, b) => a - b);
}

export function randK(update, { density, k, rescale }, rng) {
  return update.map(({ data }) => {
    const n = data.length;
    const kk = keepCount(n, density, k);
    const indices = sampleIndices(n, kk, rng);
    const factor = rescale && kk ? n / kk : 1;
    return { indices, values: Float64Array.from(indices, (i) => (factor === 1 ? data[i] : data[i] * factor)) };
  });
}

export const keepAll = (update) => update.map(({ data }) => ({ indices: null, values: data }));
