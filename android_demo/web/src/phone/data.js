// The phone's own data: bundled sample digits (data/samples.json, from fedfleet's training
// split of sklearn digits) plus digits the user draws. An example is { pixels: 64 ints in
// 0..16, label, source }; training sees pixels / 16, as device_runtime.data.load_dataset.
//
// A drawing becomes a digit the way sklearn's were made (UCI "optdigits"): the ink is
// size-normalised into a 32x32 bitmap, then each 4x4 block counts its set pixels (0..16).

const BASE17 = "0123456789abcdefg";

/** Samples, or the `shard` of `of` (every of-th one from shard) so tabs hold different data. */
export async function loadSamples(url, { shard = 0, of = 1 } = {}) {
  const doc = await (await fetch(url)).json();
  return doc.pixels
    .map((text, i) => ({ pixels: Uint8Array.from(text, (ch) => BASE17.indexOf(ch)), label: doc.labels[i], source: "sample" }))
    .filter((_, i) => i % of === shard);
}

/** { x: Float32Array(N*64) in [0, 1], y: labels } for the trainer. */
export function tensorData(examples) {
  const x = new Float32Array(examples.length * 64);
  examples.forEach((e, i) => e.pixels.forEach((v, j) => { x[i * 64 + j] = v / 16; }));
  return { x, y: examples.map((e) => e.label) };
}

/** The 8x8 digit (0..16) drawn on `canvas` (ink = alpha), or null when nothing is drawn. */
export function digitFromCanvas(canvas) {
  const { width, height } = canvas;
  const alpha = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  let [x0, y0, x1, y1] = [width, height, -1, -1];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (alpha[(y * width + x) * 4 + 3] > 32) [x0, y0, x1, y1] = [Math.min(x0, x), Math.min(y0, y), Math.max(x1, x), Math.max(y1, y)];
    }
  }
  if (x1 < 0) return null;
  const side = Math.max(x1 - x0, y1 - y0) + 1; // keep the aspect ratio: a "1" stays thin
  const cx = (x0 + x1) / 2;
  const cy = (y0 + y1) / 2;
  const small = new OffscreenCanvas(32, 32);
  const ctx = small.getContext("2d");
  ctx.drawImage(canvas, cx - side / 2, cy - side / 2, side, side, 0, 0, 32, 32);
  const bits = ctx.getImageData(0, 0, 32, 32).data;
  const pixels = new Uint8Array(64);
  for (let y = 0; y < 32; y++) {
    for (let x = 0; x < 32; x++) pixels[(y >> 2) * 8 + (x >> 2)] += bits[(y * 32 + x) * 4 + 3] > 96;
  }
  return pixels;
}

/** Draw an 8x8 digit (0..16) as grey blocks, for the preview next to the canvas. */
export function drawDigit(canvas, pixels) {
  const ctx = canvas.getContext("2d");
  const cell = canvas.width / 8;
  pixels.forEach((v, i) => {
    const shade = 255 - Math.round((v / 16) * 255);
    ctx.fillStyle = `rgb(${shade},${shade},${shade})`;
    ctx.fillRect((i % 8) * cell, Math.floor(i / 8) * cell, cell, cell);
  });
}
