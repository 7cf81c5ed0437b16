// Browser scenarios for the web chat, the agent console and the supervisor view, in Debian's chromium
// driven by playwright-core. Run by tests/browser.rs against the real binary:
//   node tests/browser/chat.cjs <base url> <screenshot dir>
// with NODE_PATH pointing at the node_modules holding playwright-core. Exits non-zero on failure.
"use strict";
const assert = require("node:assert/strict");
const path = require("node:path");
const { chromium } = require("playwright-core");

const [base, screenshots] = process.argv.slice(2);
if (!base || !screenshots) {
  console.error("usage: chat.cjs <base url> <screenshot dir>");
  process.exit(2);
}
const TIMEOUT = 15000;

async function signInAgent(page, agent) {
  await page.goto(`${base}/console`);
  await page.fill("#agent-id", agent);
  await page.fill("#agent-token", `demo-${agent}-token`);
  await page.click("#signin button[type=submit]");
  await page.waitForSelector("#app:not(.hidden)");
  await page.waitForFunction((id) => document.getElementById("who").textContent.includes(id), agent);
}

async function setPresence(page, presence) {
  await page.selectOption("#presence", presence);
  await page.waitForFunction((p) => document.getElementById("presence").value === p, presence);
}

async function openWidget(page) {
  await page.goto(`${base}/demo`);
  await page.click(".sb-launcher");
  await page.waitForSelector(".sb-window.sb-open");
  await page.waitForFunction(() => document.querySelector(".sb-status").textContent !== "");
}

async function customerSays(page, text) {
  await page.fill(".sb-form input", text);
  await page.press(".sb-form input", "Enter");
  // Acknowledged (stored) once no bubble is pending.
  await page.waitForFunction(() => document.querySelectorAll(".sb-pending").length === 0);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--no-first-run"],
  });
  try {
    const agentContext = await browser.newContext({ viewport: { width: 1200, height: 720 } });
    const customerContext = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const agentPage = await agentContext.newPage();
    const customerPage = await customerContext.newPage();
    for (const page of [agentPage, customerPage]) {
      page.setDefaultTimeout(TIMEOUT);
      page.on("pageerror", (error) => { throw new Error(`page error: ${error.message}`); });
    }

    // 1. The customer writes on the demo page; the agent gets the offer, accepts and replies.
    await signInAgent(agentPage, "alice");
    await setPresence(agentPage, "available");
    await openWidget(customerPage);
    await customerSays(customerPage, "Hello, my tent pole snapped");
    const offer = agentPage.locator("#offers .offer");
    await offer.waitFor();
    await agentPage.screenshot({ path: path.join(screenshots, "console-offer.png") });
    await offer.locator(".accept").click();
    await agentPage.waitForSelector("#detail:not(.hidden)");
    await agentPage.locator("#log .msg.in .text", { hasText: "Hello, my tent pole snapped" }).waitFor();
    await customerPage.locator(".sb-note", { hasText: "alice joined the chat" }).waitFor();
    await agentPage.fill("#reply", "Sorry to hear that! A new pole is on its way.");
    await agentPage.click("#reply-form button[type=submit]");
    await customerPage.locator(".sb-agent", { hasText: "A new pole is on its way." }).waitFor();
    await agentPage.locator("#log .msg.out .text", { hasText: "A new pole is on its way." }).waitFor();

    // 2. An XSS attempt both ways is shown as text and runs nothing.
    const attack = `<img src=x onerror="window.__xss='customer'"><b>bold</b>`;
    await customerSays(customerPage, attack);
    const shown = agentPage.locator("#log .msg.in .text").last();
    await agentPage.waitForFunction((text) => [...document.querySelectorAll("#log .msg.in .text")].some((node) => node.textContent === text), attack);
    assert.equal(await shown.textContent(), attack);
    assert.equal(await agentPage.locator("#log img, #log b").count(), 0, "customer HTML became elements in the console");
    const answer = `<script>window.__xss='agent'</script><i>it</i>`;
    await agentPage.fill("#reply", answer);
    await agentPage.click("#reply-form button[type=submit]");
    await customerPage.waitForFunction((text) => [...document.querySelectorAll(".sb-agent")].some((node) => node.textContent === text), answer);
    assert.equal(await customerPage.locator(".sb-log script, .sb-log i").count(), 0, "agent HTML became elements in the widget");
    assert.equal(await agentPage.evaluate(() => window.__xss), undefined);
    assert.equal(await customerPage.evaluate(() => window.__xss), undefined);
    await customerPage.screenshot({ path: path.join(screenshots, "widget.png") });
    await agentPage.screenshot({ path: path.join(screenshots, "console.png") });

    // 3. A reload mid-conversation shows the whole conversation once: nothing lost, nothing twice.
    const before = await customerPage.locator(".sb-msg").allTextContents();
    assert.equal(before.length, 4, `messages before the reload: ${JSON.stringify(before)}`);
    await customerPage.reload();
    await customerPage.click(".sb-launcher");
    await customerPage.waitForFunction((count) => document.querySelectorAll(".sb-msg").length >= count, before.length);
    assert.deepEqual(await customerPage.locator(".sb-msg").allTextContents(), before);

    // 4. Transfer and escalate from the console: alice transfers to bob, bob escalates to the next
    //    tier (carol), carol resolves; bob, who follows, is told; the customer sees who is with them.
    const colleague = async (agent) => {
      const context = await browser.newContext({ viewport: { width: 1200, height: 720 } });
      const page = await context.newPage();
      page.setDefaultTimeout(TIMEOUT);
      page.on("pageerror", (error) => { throw new Error(`page error: ${error.message}`); });
      await signInAgent(page, agent);
      await setPresence(page, "available");
      return page;
    };
    const bob = await colleague("bob");
    const carol = await colleague("carol");
    await agentPage.fill("#transfer-target", "bob");
    await agentPage.click("#transfer");
    await agentPage.waitForSelector("#detail.hidden", { state: "attached" });
    await bob.locator("#offers .offer .accept").click();
    await bob.locator("#log .msg.in .text", { hasText: "Hello, my tent pole snapped" }).waitFor();
    await customerPage.locator(".sb-note", { hasText: "alice left the chat" }).waitFor();
    await customerPage.locator(".sb-note", { hasText: "bob joined the chat" }).waitFor();
    await bob.click("#escalate");
    await bob.waitForSelector("#detail.hidden", { state: "attached" });
    await carol.locator("#offers .offer .accept").click();
    await carol.locator("#log .msg.in .text", { hasText: "Hello, my tent pole snapped" }).waitFor();
    await customerPage.locator(".sb-note", { hasText: "carol joined the chat" }).waitFor();
    await carol.click("#resolve");
    await bob.locator(".notice", { hasText: "was resolved" }).waitFor();
    await customerPage.locator(".sb-status", { hasText: "resolved" }).waitFor();

    // 5. After the resolve the customer rates the conversation: 4 of 5 and a comment.
    const rating = customerPage.locator(".sb-rating");
    await rating.waitFor();
    await rating.locator('.sb-star[data-score="4"]').click();
    await rating.locator(".sb-rating-comment").fill("Quick and kind <b>thanks</b>");
    await rating.locator(".sb-rating-send").click();
    await customerPage.locator(".sb-note", { hasText: "Thank you for your rating!" }).waitFor();
    await rating.waitFor({ state: "hidden" });

    // 6. A second customer opens the chat while agents are online; then every agent steps away, so
    //    the customer's message waits and they are told their place and estimated wait.
    const secondContext = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const second = await secondContext.newPage();
    second.setDefaultTimeout(TIMEOUT);
    await openWidget(second);
    assert.equal(await second.locator(".sb-offline").isHidden(), true, "the offline form shows while agents are online");
    await setPresence(agentPage, "away");
    await setPresence(bob, "away");
    await setPresence(carol, "away");
    await customerSays(second, "Is the shop open on Sunday?");
    await second.locator(".sb-status", { hasText: "number 1 in the queue" }).waitFor();

    // 7. With no agent online a third customer gets the offline form; the message becomes a
    //    conversation that waits for the next agent.
    const thirdContext = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const third = await thirdContext.newPage();
    third.setDefaultTimeout(TIMEOUT);
    await openWidget(third);
    const offline = third.locator(".sb-offline");
    await offline.waitFor();
    assert.equal(await third.locator(".sb-form").isHidden(), true, "the chat box shows while nobody can answer");
    await offline.locator(".sb-offline-name").fill("Ann");
    await offline.locator(".sb-offline-email").fill("ann@example.com");
    await offline.locator(".sb-offline-text").fill("Please call me back about my order");
    await third.screenshot({ path: path.join(screenshots, "widget-offline.png") });
    await offline.locator("button[type=submit]").click();
    await third.locator(".sb-note", { hasText: "We will answer" }).waitFor();
    await offline.waitFor({ state: "hidden" });

    // 8. The supervisor sees the queues, the agents, both waiting conversations and the rating
    //    (its comment as text).
    const supervisorPage = await agentContext.newPage();
    supervisorPage.setDefaultTimeout(TIMEOUT);
    await supervisorPage.setViewportSize({ width: 1400, height: 720 });
    await supervisorPage.goto(`${base}/console/supervisor`);
    await supervisorPage.fill("#admin-token", "demo-admin-token");
    await supervisorPage.click("#signin button[type=submit]");
    await supervisorPage.locator("#queues tr", { hasText: "support" }).waitFor();
    await supervisorPage.locator("#agents tr", { hasText: "alice" }).waitFor();
    await supervisorPage.waitForFunction(() => document.querySelectorAll("#waiting tr").length === 2);
    await supervisorPage.locator("#csat tr", { hasText: "Quick and kind <b>thanks</b>" }).waitFor();
    await supervisorPage.locator("#csat-summary", { hasText: "average 4.00 of 5 over 1 rating" }).waitFor();
    assert.equal(await supervisorPage.locator("#csat b").count(), 0, "a rating's comment became HTML");
    await supervisorPage.screenshot({ path: path.join(screenshots, "supervisor.png") });
    console.log("browser scenarios passed");
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
