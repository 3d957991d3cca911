// Drive the node's job page (/ui) in Debian's headless Chromium (playwright-core).
//   node ui_check.cjs plan.json  -> JSON on stdout
// plan: { url, attempts: [{ token, expect: "table" | "error" }], screenshot }
'use strict';
const fs = require('fs');
const { chromium } = require('playwright-core');

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

(async () => {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: FLAGS });
  const out = [];
  try {
    for (const attempt of plan.attempts) {
      const page = await browser.newPage();
      const consoleErrors = [];
      page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
      page.on('pageerror', (e) => consoleErrors.push(String(e)));
      await page.goto(plan.url);
      await page.fill('#token', attempt.token);
      await page.click('button[type=submit]');
      // (the page's CSP forbids eval, so wait with a selector, not waitForFunction)
      await page.waitForSelector('#status:not(:empty)', { timeout: 15000 });
      const rows = await page.$$eval('#jobs tbody tr', (trs) =>
        trs.map((tr) => ({ state: tr.dataset.state, cells: [...tr.children].map((td) => td.textContent) })));
      const status = await page.textContent('#status');
      const tableVisible = await page.isVisible('#jobs');
      if (attempt.expect === 'table' && plan.screenshot) await page.screenshot({ path: plan.screenshot });
      out.push({ status, rows, tableVisible, consoleErrors });
      await page.close();
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { process.stderr.write(String(e.stack || e)); process.exit(1); });
