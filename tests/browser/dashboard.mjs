// Opens the fedfleet dashboard in Debian's headless Chromium and reports what the page shows.
//
//   node dashboard.mjs URL TARGET_VERSION SCREENSHOT.png
//
// Prints one JSON line once the first snapshot is rendered ({"event": "ready", ...}), then one
// when the page shows model version TARGET_VERSION and as many round records ({"event": "done",
// ...}) after saving a screenshot. The page is never reloaded: reaching the target proves the live updates work.
import { chromium } from "playwright-core";

const [url, target, screenshot] = process.argv.slice(2);
if (!url || !target || !screenshot) {
  console.error("usage: node dashboard.mjs URL TARGET_VERSION SCREENSHOT.png");
  process.exit(2);
}
const TIMEOUT_MS = Number(process.env.DASHBOARD_TIMEOUT_MS || 120000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", // never a downloaded browser
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});

async function shown(page) {
  return page.evaluate(() => {
    const tile = (id) => {
      const el = document.getElementById(id);
      return { text: el.textContent, value: el.dataset.value ?? null };
    };
    return {
      version: tile("version"),
      round: tile("round"),
      accuracy: tile("accuracy"),
      phones_registered: tile("phones-registered"),
      connection: document.getElementById("conn").textContent,
      charts: [...document.querySelectorAll(".chart")].map((c) => ({
        id: c.id, canvas: c.querySelector("canvas") !== null, text: c.textContent.slice(0, 200),
      })),
      snapshots: Number(document.body.dataset.snapshots || 0),
      rounds: Number(document.body.dataset.rounds || 0),
    };
  });
}

try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("requestfailed", (r) => {
    if (!r.url().endsWith("/v1/events")) errors.push(`request failed: ${r.url()}`); // the stream ends at exit
  });
  await page.goto(url, { waitUntil: "load", timeout: TIMEOUT_MS });
  await page.waitForFunction(() => Number(document.body.dataset.snapshots || 0) > 0, null, { timeout: TIMEOUT_MS });
  console.log(JSON.stringify({ event: "ready", ...(await shown(page)) }));
  await page.waitForFunction(
    (t) => document.getElementById("version").dataset.value === t
      && document.body.dataset.rounds === t
      && document.querySelector("#chart-quality canvas") !== null,
    target, { timeout: TIMEOUT_MS, polling: 100 },
  );
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ event: "done", ...(await shown(page)), errors }));
} finally {
  await browser.close();
}
