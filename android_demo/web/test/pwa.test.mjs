// The installable-app parts that need no browser: the service worker precaches every module
// the page can import (so the phone opens offline), and the web manifest is well formed.

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..");

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : [join(dir, e.name)]));
}

test("the service worker precaches every module under src/", () => {
  const sw = readFileSync(join(WEB, "sw.js"), "utf8");
  const listed = new Set([...sw.matchAll(/"(src\/[^"]+)"/g)].map((m) => m[1]));
  const modules = walk(join(WEB, "src")).map((f) => relative(WEB, f).split("\\").join("/"));
  assert.deepEqual([...listed].sort(), modules.sort());
});

test("the web manifest names the app, its scope and an icon", () => {
  const manifest = JSON.parse(readFileSync(join(WEB, "manifest.webmanifest"), "utf8"));
  assert.equal(manifest.start_url, "./");
  assert.equal(manifest.display, "standalone");
  assert.ok(manifest.icons.length && manifest.icons.every((i) => readFileSync(join(WEB, i.src)).length > 0));
});
