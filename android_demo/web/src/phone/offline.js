// What the phone needs to open without a network, beyond the app the service worker keeps:
// the last verified bundle files and the last model, in the Cache Storage the service worker
// shares ("fedfleet-data"), and the last task description in IndexedDB (phone.js).

const DATA_CACHE = "fedfleet-data";

/** Keep `bytes` as the offline copy of GET `path`. */
export async function remember(path, bytes) {
  if (typeof caches === "undefined") return;
  const cache = await caches.open(DATA_CACHE);
  await cache.put(new Request(path), new Response(bytes));
}

/** The offline copy of GET `path`, or null. */
export async function recall(path) {
  if (typeof caches === "undefined") return null;
  const hit = await (await caches.open(DATA_CACHE)).match(new Request(path));
  return hit ? new Uint8Array(await hit.arrayBuffer()) : null;
}
