// Headless Chromium screenshot of a page of the Dagster UI (tests only).
// usage: node screenshot.mjs URL OUT.png [TEXT ...]  waits until every TEXT is visible, dismisses the
// Dagster community dialog if it shows, saves the screenshot and prints {"found": [...], "title": ...}.
import { chromium } from "playwright-core";

const [url, out, ...texts] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url, { waitUntil: "load", timeout: 60000 });
  const found = [];
  for (const text of texts) {
    await page.getByText(text, { exact: true }).first().waitFor({ state: "visible", timeout: 60000 });
    found.push(text);
  }
  try {
    // asset nodes fill in their latest event and checks after the graph is drawn
    await page.getByText("Loading...", { exact: true }).first().waitFor({ state: "hidden", timeout: 30000 });
  } catch {
    // still loading after 30 s: take the screenshot as it is
  }
  const skip = page.getByRole("button", { name: "Skip" });
  try {
    await skip.waitFor({ state: "visible", timeout: 3000 });
    await skip.click();
    await skip.waitFor({ state: "hidden", timeout: 5000 });
  } catch {
    // no dialog this time
  }
  try {
    // the page sets its own title once its route has rendered; until then it is the app's "Dagster"
    await page.waitForFunction(() => document.title && document.title !== "Dagster", null, { timeout: 20000 });
  } catch {
    // a page that keeps the default title: report it as it is
  }
  await page.waitForTimeout(500);
  await page.screenshot({ path: out });
  console.log(JSON.stringify({ found, title: await page.title() }));
} finally {
  await browser.close();
}
