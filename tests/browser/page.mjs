// The demo page in a real browser (Debian's chromium through playwright-core) against a
// running stack (`cargo xtask dev`): a greeting is answered at the edge, a food request is
// queued and answered by the worker, a classify batch reaches 100 %.
//
//   PAGE_URL=http://127.0.0.1:8787 API_KEY=… [CHROMIUM=/usr/bin/chromium]
//   [ARTIFACTS=dir] [SCREENSHOT=page.png] node tests/browser/page.mjs
//
// Exit 0 when every step passed; otherwise a message, and `failure.png` plus the page's
// HTML in ARTIFACTS.

import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const url = process.env.PAGE_URL;
const key = process.env.API_KEY;
const artifacts = process.env.ARTIFACTS || ".";
if (!url || !key) {
  console.error("PAGE_URL and API_KEY are required");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--no-first-run",
  ],
});
const page = await browser.newPage({ viewport: { width: 390, height: 844 }, locale: "ko-KR" });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));

const step = async (name, f) => {
  const t = Date.now();
  await f();
  console.log(`ok   ${name} (${Date.now() - t} ms)`);
};

try {
  await step("page loads with a labelled key field", async () => {
    const r = await page.goto(url + "/", { waitUntil: "load" });
    if (!r || r.status() !== 200) throw new Error(`GET / answered ${r && r.status()}`);
    await page.getByLabel(/API/i).first().waitFor();
  });

  await step("the key is saved in sessionStorage only", async () => {
    await page.fill("#api-key", key);
    await page.click("#save-key");
    const stored = await page.evaluate(() => ({
      session: sessionStorage.getItem("cheapServeApiKey"),
      local: localStorage.length,
    }));
    if (stored.session !== key || stored.local !== 0) {
      throw new Error(`storage: ${JSON.stringify(stored)}`);
    }
  });

  await step("a greeting is answered at the edge", async () => {
    await page.fill("#chat-input", "안녕하세요!");
    await page.keyboard.press("Enter");
    const li = page.locator('#chat-log li.msg.bot[data-route="edge"]').first();
    await li.waitFor({ timeout: 15000 });
    const badge = await li.locator(".route-edge").textContent();
    if (!/greeting/.test(badge || "")) throw new Error(`edge badge: ${badge}`);
  });

  await step("a greeting mixed with a food request is queued, then answered by the worker", async () => {
    await page.fill("#chat-input", "안녕! 근처 짜장면집 추천해줘");
    await page.click("#chat-send");
    const queued = page.locator('#chat-log li.msg.bot[data-route="queue"]').first();
    await queued.waitFor({ timeout: 15000 });
    const done = page.locator('#chat-log li.msg.bot[data-route="queue"][data-status="succeeded"]');
    await done.first().waitFor({ timeout: 90000 });
    const reply = await done.first().locator(".reply-text").textContent();
    if (!reply || !reply.trim()) throw new Error(`no reply text: ${JSON.stringify(reply)}`);
  });

  await step("a classify batch reaches 100 %", async () => {
    await page.click("#batch-run");
    await page.waitForFunction(
      () => document.querySelector("#batch-status")?.dataset.status === "succeeded",
      null,
      { timeout: 90000 },
    );
    const value = await page.locator("#batch-progress").evaluate((p) => p.value);
    if (value !== 100) throw new Error(`progress ${value}`);
  });

  await step("keyboard: Tab reaches the chat field with a visible focus ring", async () => {
    await page.focus("#api-key");
    let found = false;
    for (let i = 0; i < 30 && !found; i++) {
      await page.keyboard.press("Tab");
      found = await page.evaluate(() => document.activeElement?.id === "chat-input");
    }
    if (!found) throw new Error("Tab never reached #chat-input");
    const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
    if (outline === "none") throw new Error("no focus outline on #chat-input");
  });

  await step("no horizontal scrolling at 320 px", async () => {
    await page.setViewportSize({ width: 320, height: 700 });
    const wide = await page.evaluate(() => document.documentElement.scrollWidth);
    if (wide > 320) throw new Error(`page is ${wide} px wide at 320 px`);
    await page.setViewportSize({ width: 390, height: 844 });
  });

  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  if (process.env.SCREENSHOT) {
    await page.setViewportSize({ width: 900, height: 1100 });
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  }
  await browser.close();
} catch (e) {
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: join(artifacts, "failure.png"), fullPage: true }).catch(() => {});
  writeFileSync(join(artifacts, "failure.html"), await page.content().catch(() => ""));
  console.error(`FAILED: ${e && e.message ? e.message : e}`);
  if (errors.length) console.error(`page errors: ${errors.join("; ")}`);
  console.error(`screenshot and HTML in ${artifacts}`);
  await browser.close();
  process.exit(1);
}
