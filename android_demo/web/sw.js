// The web phone's service worker: the app (page, modules, bundled digits, onnxruntime-web) is
// precached at install, so the phone opens offline. The verified bundle and the last model are
// kept by the page itself in the "fedfleet-data" cache (src/phone/offline.js), and the
// error-feedback residual and any unacknowledged upload in IndexedDB (src/phone/store.js).
// Bump VERSION when the file list or the app changes.

const VERSION = "fedfleet-phone-4";
const APP_CACHE = `app-${VERSION}`;
const DATA_CACHE = "fedfleet-data"; // written by the page: kept across app versions
const PRECACHE = [
  "./",
  "index.html",
  "app.css",
  "manifest.webmanifest",
  "icon.svg",
  "data/samples.json",
  "src/codec/clip.js",
  "src/codec/config.js",
  "src/codec/encoder.js",
  "src/codec/feedback.js",
  "src/codec/noise.js",
  "src/codec/privacy.js",
  "src/codec/rng.js",
  "src/codec/sparsify.js",
  "src/codec/state.js",
  "src/codec/values.js",
  "src/phone/api.js",
  "src/phone/app.js",
  "src/phone/bundle.js",
  "src/phone/data.js",
  "src/phone/model_state.js",
  "src/phone/offline.js",
  "src/phone/onnx_graph.js",
  "src/phone/outbox.js",
  "src/phone/phone.js",
  "src/phone/signing.js",
  "src/phone/store.js",
  "src/phone/trainer.js",
  "src/wire/canonical.js",
  "src/wire/crc32.js",
  "src/wire/encodings.js",
  "src/wire/errors.js",
  "src/wire/inflate.js",
  "src/wire/packing.js",
  "src/wire/quant.js",
  "src/wire/wire.js",
  "vendor/ort.wasm.min.mjs",
  "vendor/ort-wasm-simd-threaded.mjs",
  "vendor/ort-wasm-simd-threaded.wasm",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(APP_CACHE).then((cache) => cache.addAll(PRECACHE)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  const keep = [APP_CACHE, DATA_CACHE];
  event.waitUntil(
    caches.keys()
      .then((names) => Promise.all(names.filter((n) => !keep.includes(n)).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

/** The cached app file at once, refreshed in the background for the next load. */
async function staleWhileRevalidate(request) {
  const cache = await caches.open(APP_CACHE);
  const cached = await cache.match(request, { ignoreSearch: true }); // ?name=...&autostart=1 is the page's own
  const refresh = fetch(request)
    .then((response) => (response.status === 200 ? cache.put(request, response.clone()).then(() => response) : response))
    .catch(() => cached);
  return cached ?? refresh;
}

self.addEventListener("fetch", (event) => {
  const { request } = event;
  const url = new URL(request.url);
  const scope = new URL(self.registration.scope).pathname;
  // only the app's own files: the API (check-ins, models, uploads) always goes to the network
  if (request.method === "GET" && url.origin === self.location.origin && url.pathname.startsWith(scope)) {
    event.respondWith(staleWhileRevalidate(request));
  }
});
