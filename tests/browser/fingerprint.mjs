// One fedfleet web phone (/phone/) in Debian's headless Chromium, through a change of the server's model.
//
//   node fingerprint.mjs '{"url": "http://HOST/phone/", "name": "web-0", "timeoutMs": 120000}'
//
// Opens the phone (autostart) and waits until it has registered and keeps a verified bundle:
// prints {"event": "ready", "tab": snapshot}. Then waits for a line on stdin (meanwhile the server at
// that address was replaced by one running another model), reloads the phone, which registers again
// with the fingerprint of the bundle it keeps, and waits until it stops or finishes:
// prints {"event": "done", "tab": snapshot, "errors": [...]}. Exits 1 on timeout.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2] ?? "{}");
if (!config.url) {
  console.error('usage: node fingerprint.mjs \'{"url": "http://HOST/phone/", "name": "web-0"}\'');
  process.exit(2);
}
const TIMEOUT_MS = config.timeoutMs ?? 120000;
const emit = (event, data = {}) => console.log(JSON.stringify({ event, ...data }));
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", // never a downloaded browser
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});

async function until(page, predicate, what) {
  const deadline = Date.now() + TIMEOUT_MS;
  for (;;) {
    const snap = await page.evaluate(() => (window.fedfleet ? window.fedfleet.snapshot() : null)).catch(() => null);
    if (snap && predicate(snap)) return snap;
    if (Date.now() > deadline) {
      emit("timeout", { waiting_for: what, tab: snap });
      process.exitCode = 1;
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

try {
  const context = await browser.newContext({ viewport: { width: 430, height: 1000 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  const query = new URLSearchParams({ name: config.name ?? "web-0", shard: "0/1", autostart: "1" });
  await page.goto(`${config.url}?${query}`, { waitUntil: "load", timeout: TIMEOUT_MS });
  emit("ready", { tab: await until(page, (s) => s.phoneId && s.bundleBytes !== null, "registration and bundle") });
  await lines.next(); // the server now runs another model
  await page.reload({ waitUntil: "load", timeout: TIMEOUT_MS });
  const tab = await until(page, (s) => s.phase === "stopped" || s.phase === "finished", "the phone to stop");
  emit("done", { tab, errors });
} finally {
  await browser.close();
}
