// Opens fedfleet web phones (/phone/) as tabs of Debian's headless Chromium and reports what they do.
//
//   node webphone.mjs '{"url": ".../phone/", "tabs": [{"name": "web-0", "shard": "0/5"}, ...], ...}'
//
// Config: url; tabs: [{ name, shard, draw (a label: before joining, draw a digit and add it),
// lose (drop the answer to the first upload after the server got it, then go offline for
// offlineMs), afterLost (open this tab only once a lose tab's answer was dropped, so the lost upload is
// the task's first whatever the machine's load), query (more URL parameters for this tab, e.g. {"chain": "0"}),
// reloadAfter (N: reload this tab once N of its uploads were accepted; it goes on from what it kept),
// afterReload (open this tab only once a reloadAfter tab was reloaded) }]; screenshot (PNG path, of tab 0); offlineReload (reload tab 0 offline at the end);
// benchmark ({ batch, steps }: time train_step.onnx in tab 0 once every tab is idle); timeoutMs.
// Every tab is its own browser context (its own IndexedDB: its own phone).
//
// Prints JSON lines: {"event": "ready"} once every tab registered and loaded its bundle,
// {"event": "lost", ...} when an upload's answer was dropped, {"event": "reloaded", "tab", "before",
// "after"} (snapshots) when a reloadAfter tab was reloaded, and {"event": "done", "tabs":
// [snapshot...], ...} once every tab's phase is "finished". Exits 1 on timeout.
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2] ?? "{}");
if (!config.url || !config.tabs?.length) {
  console.error('usage: node webphone.mjs \'{"url": "http://HOST/phone/", "tabs": [{"name": "web-0"}]}\'');
  process.exit(2);
}
const TIMEOUT_MS = config.timeoutMs ?? 300000;
const emit = (event, data = {}) => console.log(JSON.stringify({ event, ...data }));
let announceLost = () => {};
const lostSeen = new Promise((resolve) => { announceLost = resolve; });
let announceReload = () => {};
const reloadSeen = new Promise((resolve) => { announceReload = resolve; });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", // never a downloaded browser
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});

// null while the page is between documents (a reload)
const snapshot = (page) => page.evaluate(() => (window.fedfleet ? window.fedfleet.snapshot() : null)).catch(() => null);

async function waitFor(tabs, predicate, what) {
  const deadline = Date.now() + TIMEOUT_MS;
  for (;;) {
    const snaps = await Promise.all(tabs.map((t) => snapshot(t.page)));
    if (snaps.every((s) => s && predicate(s))) return snaps;
    if (Date.now() > deadline) {
      emit("timeout", { waiting_for: what, tabs: snaps, errors: tabs.flatMap((t) => t.errors) });
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Drop the answer to this tab's first upload after the server received it, then go offline. */
async function loseFirstUpload(tab, { offlineMs = 3000 }) {
  let lost = false;
  // /v1/update with or without ?checkin=... (an upload that brings the next check-in)
  await tab.context.route((url) => url.pathname.endsWith("/v1/update"), async (route) => {
    if (lost) return route.continue();
    lost = true;
    const response = await route.fetch(); // the server gets the update and answers...
    const chained = response.headers()["x-fedfleet-update"]; // the upload's answer, when the body is a check-in's
    const answer = chained ? JSON.parse(chained) : await response.json().catch(() => null);
    await tab.context.setOffline(true);
    await route.abort("internetdisconnected"); // ...but the phone never hears it
    emit("lost", { tab: tab.name, status: response.status(), answer, chained: Boolean(chained) });
    announceLost();
    setTimeout(() => tab.context.setOffline(false).catch(() => {}), offlineMs);
  });
}

/** Reload the tab once `count` of its uploads were accepted (the page autostarts again). */
async function reloadAfter(tab, count) {
  const deadline = Date.now() + TIMEOUT_MS;
  let before = await snapshot(tab.page);
  while (!(before && before.accepted >= count)) {
    if (Date.now() > deadline) {
      emit("timeout", { waiting_for: `${tab.name}'s upload ${count}`, tabs: [before], errors: tab.errors });
      process.exit(1);
    }
    await new Promise((r) => setTimeout(r, 100));
    before = await snapshot(tab.page);
  }
  await tab.page.reload({ waitUntil: "load" });
  await tab.page.waitForFunction(() => {
    const s = window.fedfleet && window.fedfleet.snapshot();
    return s && s.phoneId !== null && s.bundleBytes !== null;
  }, null, { timeout: TIMEOUT_MS });
  emit("reloaded", { tab: tab.name, before, after: await snapshot(tab.page) });
  announceReload();
}

async function drawDigit(page, strokes) {
  const box = await page.locator("#pad").boundingBox();
  for (const stroke of strokes) {
    await page.mouse.move(box.x + stroke[0][0] * box.width, box.y + stroke[0][1] * box.height);
    await page.mouse.down();
    for (const [x, y] of stroke.slice(1)) await page.mouse.move(box.x + x * box.width, box.y + y * box.height, { steps: 8 });
    await page.mouse.up();
  }
}

const SEVEN = [[[0.3, 0.2], [0.7, 0.2], [0.45, 0.85]]];
const ONE = [[[0.4, 0.3], [0.55, 0.15], [0.55, 0.85]]];

async function serviceWorkerReport(page) {
  return page.evaluate(async () => {
    const reg = await navigator.serviceWorker.ready;
    const names = await caches.keys();
    const entries = {};
    for (const name of names) entries[name] = (await (await caches.open(name)).keys()).map((r) => new URL(r.url).pathname);
    return { active: Boolean(reg.active), controlled: Boolean(navigator.serviceWorker.controller), caches: entries };
  });
}

try {
  const tabs = [];
  for (const spec of config.tabs) {
    if (spec.afterLost) await lostSeen;
    if (spec.afterReload) await reloadSeen;
    const context = await browser.newContext({
      viewport: { width: 430, height: 1000 },
      serviceWorkers: spec.lose ? "block" : "allow", // routing needs the requests outside a service worker
    });
    const page = await context.newPage();
    const tab = { name: spec.name, spec, context, page, errors: [] };
    page.on("pageerror", (e) => tab.errors.push(`pageerror: ${e.message}`));
    page.on("console", (m) => { if (m.type() === "error") tab.errors.push(`console: ${m.text()}`); });
    if (spec.lose) await loseFirstUpload(tab, spec.lose);
    const query = new URLSearchParams({ name: spec.name, shard: spec.shard ?? "0/1", ...(spec.query ?? {}) });
    if (spec.draw === undefined) query.set("autostart", "1");
    await page.goto(`${config.url}?${query}`, { waitUntil: "load", timeout: TIMEOUT_MS });
    if (spec.draw !== undefined) { // as a user would: draw a digit, label it, add it, then join
      await page.waitForFunction(() => document.body.dataset.ready === "1", null, { timeout: TIMEOUT_MS });
      await drawDigit(page, SEVEN);
      await page.selectOption("#label", String(spec.draw));
      await page.click("#add");
      await page.click("#start");
    }
    tabs.push(tab);
    if (spec.reloadAfter) {
      reloadAfter(tab, spec.reloadAfter).catch((err) => {
        emit("timeout", { waiting_for: `${tab.name}'s reload`, error: err.message, errors: tab.errors });
        process.exit(1);
      });
    }
  }
  const ready = await waitFor(tabs, (s) => s.phoneId && s.bundleBytes !== null, "registration and bundle");
  emit("ready", { tabs: ready });
  const done = await waitFor(tabs, (s) => s.phase === "finished", "the end of the task");
  const first = tabs[0];
  const report = { tabs: done, errors: tabs.flatMap((t) => t.errors.map((e) => `${t.name}: ${e}`)) };
  if (config.benchmark) { // every tab is idle now: time train_step.onnx alone in tab 0
    report.benchmark = await first.page.evaluate(async ({ batch, steps }) => {
      const { phone } = window.fedfleet;
      const { tensorData } = await import("./src/phone/data.js");
      const ms = await phone.trainer.timeSteps(phone.model.params, tensorData(phone.examples), batch, steps);
      return { batch, steps, msPerStep: ms };
    }, config.benchmark);
  }
  if (!first.spec.lose) report.serviceWorker = await serviceWorkerReport(first.page);
  if (config.screenshot) {
    await drawDigit(first.page, ONE); // show the preview and the model's guess
    await first.page.waitForFunction(() => document.getElementById("prediction").textContent.includes("says"));
    await first.page.screenshot({ path: config.screenshot, fullPage: true });
    report.prediction = await first.page.locator("#prediction").textContent();
  }
  if (config.offlineReload) {
    await first.context.setOffline(true);
    await first.page.reload({ waitUntil: "load" });
    if (first.spec.draw !== undefined) { // it was not autostarted: join again, by hand
      await first.page.waitForFunction(() => document.body.dataset.ready === "1", null, { timeout: TIMEOUT_MS });
      await first.page.click("#start");
    }
    await first.page.waitForFunction(() => {
      const s = window.fedfleet && window.fedfleet.snapshot();
      return s && s.phoneId !== null && s.version !== null && s.phase === "offline";
    }, null, { timeout: TIMEOUT_MS });
    report.offlineReload = await snapshot(first.page);
  }
  emit("done", report);
} finally {
  await browser.close();
}
