// Step 1: norm clipping, which bounds each phone's influence (the DP sensitivity C).
//
// DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
// Models") clips the whole update to L2 norm C; per-layer clipping splits the bound so the
// whole update still has norm <= C: C / sqrt(L) for L2, C / L for L1 (protocol/codec/clip.py).
//
// An update is an array of { name, shape, data: Float64Array }; steps return new arrays.

/** L1 or L2 norm of all tensors taken together, in binary64. */
export function updateNorm(update, ord = 2) {
  let sum = 0;
  for (const { data } of update) for (const x of data) sum += ord === 1 ? Math.abs(x) : x * x;
  return ord === 1 ? sum : Math.sqrt(sum);
}

function scaled(update, bound, ord) {
  const norm = updateNorm(update, ord);
  if (norm <= bound) return update;
  const factor = bound / norm;
  return update.map((t) => ({ ...t, data: t.data.map((x) => x * factor) }));
}

export function clip(update, { bound, perLayer = false, ord = 2 }) {
  if (!perLayer) return scaled(update, bound, ord);
  const layers = Math.max(update.length, 1);
  const share = bound / (ord === 2 ? Math.sqrt(layers) : layers);
  return update.flatMap((t) => scaled([t], share, ord));
}
