// The demo page in headless Chromium (Debian's chromium driven by playwright-core): it loads the recall
// model on onnxruntime-web (WASM), answers from its state, and a downloaded snapshot restores the memory
// after a reset. The downloaded snapshot is left for tests/test_js.py to resume in Python.

import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { chromium } from 'playwright-core';
import { serve } from '../demo/serve.js';
import { load } from '../src/node.js';
import { fixtureDir } from './fixtures.js';

const CHROMIUM = process.env.WMDEPLOY_CHROMIUM ?? '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

test('the demo answers the recall task in Chromium, and a snapshot round trip restores its memory', async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM}: no Chromium (Debian: apt-get install chromium; or set WMDEPLOY_CHROMIUM)`);
  const dir = fixtureDir();
  const server = await serve({ model: join(dir, 'recall.onnx') });
  const profile = mkdtempSync(join(tmpdir(), 'wmdeploy-chromium-')); // a fresh profile every run
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: ARGS, acceptDownloads: true, viewport: { width: 900, height: 640 },
  });
  try {
    const page = browser.pages()[0] ?? (await browser.newPage());
    const errors = [];
    page.on('pageerror', (err) => errors.push(err.message));
    await page.goto(server.url);
    await page.waitForFunction(() => document.body.dataset.ready, null, { timeout: 60000 });
    assert.equal(await page.evaluate(() => document.body.dataset.ready), 'true', await page.textContent('#status'));

    const answers = () => page.$$eval('#transcript .answer', (els) => els.map((e) => e.textContent));
    const ask = async (line) => {
      const before = (await answers()).length;
      await page.fill('#line', line);
      await page.click('#send');
      await page.waitForFunction((n) => document.querySelectorAll('#transcript .answer').length > n, before);
      return (await answers()).at(-1);
    };
    assert.equal(await ask('aB cD ?a'), 'B');
    assert.equal(await ask('eF gH ?c'), 'D');

    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#snapshot')]);
    const saved = join(profile, 'recall.wmsnap');
    await download.saveAs(saved);
    // the browser's snapshot is the Python format: the Node runtime resumes it with the same step count
    const model = await load(join(dir, 'recall.onnx'));
    const steps = model.stream({ snapshot: new Uint8Array(readFileSync(saved)) }).steps;
    assert.equal(steps, 4); // 2 turns x (the prompt in one chunk + the answer token fed back)
    await model.release();

    await page.click('#reset');
    await page.setInputFiles('#restore', saved);
    await page.waitForFunction(() => document.querySelector('#transcript li:last-child')?.textContent.includes('steps of memory'));
    assert.equal(await ask('?e'), 'F');
    assert.equal(await ask('?g'), 'H');
    // the README's picture (js/demo/screenshot.png) is taken here: WMDEPLOY_DEMO_SCREENSHOT=path npm run test:browser
    if (process.env.WMDEPLOY_DEMO_SCREENSHOT) await page.screenshot({ path: process.env.WMDEPLOY_DEMO_SCREENSHOT });
    assert.deepEqual(errors, []);
    mkdirSync(join(dir, 'from_js'), { recursive: true });
    copyFileSync(saved, join(dir, 'from_js', 'browser.snap'));
  } finally {
    await browser.close();
    await server.close();
    rmSync(profile, { recursive: true, force: true });
  }
});
