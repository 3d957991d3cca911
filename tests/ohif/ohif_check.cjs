// Drive the built OHIF viewer (3.12) in Debian's headless Chromium with playwright-core.
//
//   node ohif_check.cjs plan.json   -> prints one JSON result object on stdout
//
// plan: { viewerUrl, studyUid, outDir, timeoutMs,
//         scenarios: [{ name, kind: "seg" | "sr" | "open", series: "<series description prefix>",
//                       steps: <sr only: measurements to step through> }] }
// Each scenario runs in a fresh page: open the study, dismiss the tour, take a
// screenshot of the viewport ("<name>-before.png"), then
//   seg: double-click the SEG thumbnail, answer "Yes" to hydration, open the
//        segmentation panel, read the segment rows;
//   sr:  double-click the SR thumbnail, wait for measurement text in the viewport
//        ("<name>-step0.png"), then click the viewport's "next measurement" arrow
//        `steps` times ("<name>-step<i>.png"); slice and text of each in `steps`;
// and take "<name>.png" (viewport) and "<name>-page.png" (whole page).
// Every console message (all levels, debug included: OHIF logs its error
// boundary at console.debug) and every page error is returned.
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

async function openStudy(page, plan) {
  await page.goto(`${plan.viewerUrl}/viewer?StudyInstanceUIDs=${plan.studyUid}`);
  const overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]', { hasText: 'I:' });
  await overlay.first().waitFor({ timeout: plan.timeoutMs });
  const skip = page.getByText('Skip all', { exact: true });
  if (await skip.isVisible().catch(() => false)) await skip.click();
  await page.waitForTimeout(500);
}

async function thumbnail(page, series) {
  return page.locator('[data-cy^="study-browser-thumbnail"]', { hasText: series }).first();
}

async function runSeg(page, plan, sc, out) {
  await (await thumbnail(page, sc.series)).dblclick();
  await page.locator('[data-cy="yes-hydrate-btn"]').click({ timeout: plan.timeoutMs });
  await page.locator('[data-cy="panelSegmentation-btn"]').click({ timeout: plan.timeoutMs });
  const rows = page.locator('[data-cy="data-row"]');
  await rows.first().waitFor({ timeout: plan.timeoutMs });
  await page.waitForTimeout(1500); // let the overlay render after the panel opened
  out.segments = (await rows.allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  out.segmentColors = await rows.evaluateAll((rs) =>
    rs.map((r) => (r.querySelector('span.rounded-full') || { style: {} }).style.backgroundColor || ''),
  );
}

async function runSr(page, plan, sc, out) {
  await (await thumbnail(page, sc.series)).dblclick();
  const pane = page.locator('[data-cy="viewport-pane"]').first();
  await page.locator('[data-cy="viewport-overlay-bottom-right"]', { hasText: 'I:' }).first()
    .waitFor({ timeout: plan.timeoutMs });
  // measurement text, unless OHIF rendered the slice before registering the
  // SR's annotations (then they appear on the next render: see `steps`)
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline) {
    const text = await pane.innerText().catch(() => '');
    if (/\d mm/.test(text) || out.errorBoundary()) break;
    await page.waitForTimeout(250);
  }
  await page.waitForTimeout(1000);
  // the SR opens on its first measurement; step through the others with the
  // viewport's right arrow
  out.steps = [];
  const overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]').first();
  const next = page.locator('div.h-6.flex > div.cursor-pointer').nth(1);
  for (let i = 0; i <= (sc.steps || 0) && !out.errorBoundary(); i++) {
    if (i > 0) {
      await next.click({ timeout: 5000 });
      await page.waitForTimeout(1500); // let the stack move and the annotations render
    }
    await pane.screenshot({ path: path.join(plan.outDir, `${sc.name}-step${i}.png`) });
    out.steps.push({
      slice: await overlay.innerText().catch(() => ''),
      viewportText: (await pane.innerText().catch(() => '')).replace(/\s+/g, ' ').trim(),
    });
  }
}

async function scenario(browser, plan, sc) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const started = Date.now();
  const out = { name: sc.name, console: [], pageErrors: [], error: null, ms: {} };
  out.errorBoundary = () => out.console.some((m) => m.text.includes('Error Boundary'));
  page.on('console', (m) => out.console.push({ type: m.type(), text: m.text().slice(0, 2000) }));
  page.on('pageerror', (e) => out.pageErrors.push(String(e).slice(0, 2000)));
  const pane = page.locator('[data-cy="viewport-pane"]').first();
  try {
    await openStudy(page, plan);
    out.ms.open = Date.now() - started;
    await pane.screenshot({ path: path.join(plan.outDir, `${sc.name}-before.png`) });
    if (sc.kind === 'seg') await runSeg(page, plan, sc, out);
    if (sc.kind === 'sr') await runSr(page, plan, sc, out);
  } catch (e) {
    out.error = String(e).slice(0, 2000);
  }
  page.setDefaultTimeout(5000); // after a crash the viewport may be gone: fail fast
  try {
    await page.screenshot({ path: path.join(plan.outDir, `${sc.name}-page.png`) });
    await pane.screenshot({ path: path.join(plan.outDir, `${sc.name}.png`) });
    out.viewportText = (await pane.innerText()).replace(/\s+/g, ' ').trim();
    out.slice = await page
      .locator('[data-cy="viewport-overlay-bottom-right"]')
      .first()
      .innerText()
      .catch(() => '');
    out.bodyText = (await page.innerText('body')).slice(0, 20000);
  } catch (e) {
    out.error = out.error || String(e).slice(0, 2000);
  }
  out.ms.total = Date.now() - started;
  delete out.errorBoundary;
  await page.close();
  return out;
}

(async () => {
  const t0 = Date.now();
  const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const browser = await chromium.launch({
    executablePath: plan.chromium || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
  });
  const results = [];
  const launchMs = Date.now() - t0;
  try {
    for (const sc of plan.scenarios) results.push(await scenario(browser, plan, sc));
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify({ launchMs, results }));
})().catch((e) => {
  process.stderr.write(String(e.stack || e));
  process.exit(1);
});
