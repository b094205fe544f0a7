// The Node package against files, outputs, snapshots and error messages the Python side produced
// (js/test/make_fixtures.py): equal outputs (1e-5), snapshots both ways, Python's one-line errors.

import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import * as web from '../src/browser.js';
import { InputError, SnapshotError, Tensor, generate, load, loadSnapshot } from '../src/node.js';
import { expected, fixtureDir, maxDiff, typed } from './fixtures.js';

const dir = fixtureDir();
const want = expected(dir);
const TOL = 1e-5;
web.ort.env.wasm.numThreads = 1;
// the browser entry runs here on onnxruntime-web's WASM engine (its Node build): the engine the demo page uses
// Tolerances: onnxruntime-node is the engine Python runs, equal within 1e-5; WASM kernels round float32 sums
// differently (no FMA/AVX paths), 1.1e-5 apart on recall logits of magnitude ~10: there 1e-5 absolute + relative.
const ENGINES = [['onnxruntime-node', (file) => load(join(dir, file)), 0],
  ['onnxruntime-web', (file) => web.load(new Uint8Array(readFileSync(join(dir, file)))), 1e-5]];
const HINT = / \(cast it explicitly, e\.g\. .*; wmdeploy does not cast silently\)$/; // the one part that names the language

function checkOutputs(outputs, step, label, rtol = 0) {
  for (const [name, tensor] of Object.entries(step.outputs)) {
    const diff = maxDiff(outputs[name], tensor, rtol);
    assert.ok(diff <= TOL, `${label} output '${name}': max |JS - Python| - rtol |Python| = ${diff}`);
  }
}

for (const [engine, open, rtol] of ENGINES) for (const name of Object.keys(want.streams)) {
  const c = want.streams[name];
  test(`${engine}, ${name}: spec from metadata_props, outputs equal Python's, snapshots cross both ways`, async () => {
    const model = await open(c.file);
    assert.deepEqual(model.spec.json, c.spec);
    assert.equal(model.spec.layoutHash, c.layout);
    const stream = model.stream({ batch: c.batch });
    let jsSnapshot = null;
    for (const [i, step] of c.steps.entries()) {
      if (i === c.snapshot_at) jsSnapshot = stream.snapshot();
      const inputs = Object.fromEntries(Object.entries(step.inputs).map(([k, v]) => [k, typed(v)]));
      checkOutputs(await stream.step(inputs), step, `${name} step ${i}`, rtol);
    }
    assert.equal(stream.steps, c.steps.length);

    // Python's snapshot resumes here, equal thereafter; re-snapshotted at once it is the same bytes
    const pyBytes = new Uint8Array(readFileSync(join(dir, c.snapshot)));
    const resumed = model.stream({ snapshot: pyBytes });
    assert.equal(resumed.batch, c.batch);
    assert.equal(resumed.steps, c.snapshot_at);
    assert.deepEqual(resumed.snapshot(), pyBytes);
    const continuation = [];
    for (const [i, step] of c.steps.slice(c.snapshot_at).entries()) {
      const inputs = Object.fromEntries(Object.entries(step.inputs).map(([k, v]) => [k, typed(v)]));
      const outputs = await resumed.step(inputs);
      checkOutputs(outputs, step, `${name} resumed step ${c.snapshot_at + i}`, rtol);
      continuation.push(Object.fromEntries(Object.entries(outputs).map(([k, t]) => [k, Array.from(t.data, Number)])));
    }
    // JS's own snapshot goes back to Python (tests/test_js.py resumes it there)
    const out = join(dir, 'from_js', engine);
    mkdirSync(out, { recursive: true });
    writeFileSync(join(out, `${name}.snap`), jsSnapshot);
    writeFileSync(join(out, `${name}.continuation.json`), JSON.stringify(continuation));

    // reset: the first step's outputs again
    stream.reset();
    assert.equal(stream.steps, 0);
    const first = c.steps[0];
    checkOutputs(await stream.step(Object.fromEntries(Object.entries(first.inputs).map(([k, v]) => [k, typed(v)]))), first, `${name} after reset`, rtol);
    await model.release();
  });
}

test("bad inputs: Python's one-line messages, and the state does not move", async () => {
  const models = {};
  for (const c of want.errors) {
    models[c.model] ??= await load(join(dir, want.streams[c.model].file));
    const stream = models[c.model].stream({ batch: c.batch });
    const before = stream.snapshot();
    const inputs = Object.fromEntries(Object.entries(c.inputs).map(([k, v]) => [k, v.list ?? typed(v)]));
    await assert.rejects(stream.step(inputs), (err) => {
      assert.ok(err instanceof InputError, `${err}`);
      assert.equal(err.message.replace(HINT, ''), c.message.replace(HINT, ''));
      return true;
    });
    assert.deepEqual(stream.snapshot(), before);
    assert.equal(stream.steps, 0);
  }
  // a tensor of the wrong dtype is refused too, with the JS cast in the hint
  const gru = models.gru;
  await assert.rejects(gru.stream().step({ x: new Tensor('float64', new Float64Array(3), [1, 1, 3]) }),
    /^InputError: input 'x': dtype float64, expected float32 \(cast it explicitly, e\.g\. Float32Array\.from\(values\)/);
  for (const m of Object.values(models)) await m.release();
});

test('snapshots of another layout, truncated or corrupted are refused whole, as in Python', async () => {
  const lstm = await load(join(dir, 'lstm.onnx'));
  const gruBytes = new Uint8Array(readFileSync(join(dir, 'gru.snap')));
  assert.throws(() => lstm.stream({ snapshot: gruBytes }),
    (err) => err instanceof SnapshotError && /^snapshot: state layout hash [0-9a-f]{12}\.\.\. \(states \['h'\]\) does not match this model's [0-9a-f]{12}\.\.\. \(states \['h', 'c'\]\)$/.test(err.message));
  const good = new Uint8Array(readFileSync(join(dir, 'lstm.snap')));
  assert.throws(() => lstm.stream({ snapshot: good.subarray(0, good.length - 5) }), /^SnapshotError: snapshot: checksum mismatch over \d+ bytes \(truncated or corrupted\)$/);
  const flipped = good.slice();
  flipped[100] ^= 1;
  assert.throws(() => loadSnapshot(lstm.spec, flipped), /checksum mismatch/);
  assert.throws(() => lstm.stream({ snapshot: new Uint8Array(10) }), /^SnapshotError: snapshot: 10 bytes is too short to be a snapshot \(truncated\?\)$/);
  const notOurs = good.slice();
  notOurs[0] = 0x58;
  assert.throws(() => lstm.stream({ snapshot: notOurs }), /bad magic b'XMSNAP\\r\\n', expected b'WMSNAP\\r\\n' \(not a wmdeploy snapshot\)/);
  await lstm.release();
});

test('a pool steps streams of different chunk lengths in one call, each equal to stepping it alone', async () => {
  const model = await load(join(dir, 'lstm.onnx'));
  const pool = model.pool({ capacity: 3 });
  const [a, b, c] = [pool.join(), pool.join(), pool.join()];
  assert.throws(() => pool.join(), /^InputError: pool: all 3 slots are taken/);
  const alone = [model.stream(), model.stream(), model.stream()];
  const chunks = [[[1, 2, 3], [4], [5, 6, 7]], [[8, 9], [10, 11], [12]]];
  for (const round of chunks) {
    const requests = new Map([a, b, c].map((sid, i) => [sid, { tokens: [round[i]] }]));
    const got = await pool.step(requests);
    for (const [i, sid] of [a, b, c].entries()) {
      const ref = await alone[i].step({ tokens: [round[i]] });
      assert.ok(maxDiff(got.get(sid).logits, { dims: ref.logits.dims, data: Array.from(ref.logits.data) }) <= TOL);
    }
  }
  // a bad request steps no stream; nor does an engine failure in a later call of the step (the earlier
  // call's states are not committed); a pool snapshot resumes as a Stream
  const before = [pool.snapshot(a), pool.snapshot(b)];
  await assert.rejects(pool.step(new Map([[a, { tokens: [[1]] }], [b, { tokens: [[0.5]] }]])),
    /^InputError: stream 1: input 'tokens': list of float64 values, expected int64$/);
  await assert.rejects(pool.step(new Map([[a, { tokens: [[1, 2]] }], [b, { tokens: [[99]] }]])), /out of data bounds/);
  assert.deepEqual([pool.snapshot(a), pool.snapshot(b)], before);
  assert.deepEqual(model.stream({ snapshot: pool.snapshot(c) }).state, alone[2].state);
  pool.leave(a);
  assert.throws(() => pool.snapshot(a), /^InputError: stream 0: not in this pool/);
  await model.release();
});

test("greedy generate answers the recall query as Python does, from the state alone", async () => {
  const g = want.generate;
  const model = await load(join(dir, `${g.model}.onnx`));
  const stream = model.stream();
  const generation = generate(stream, g.prompt, { maxTokens: g.max_tokens, temperature: 0 });
  assert.equal(await generation.text(), g.text);
  assert.deepEqual(generation.tokens, g.tokens);
  assert.equal(generation.finishReason, 'length');
  // a second turn continues the same memory: ask for another stored key
  assert.equal(await generate(stream, '?a', { maxTokens: 1, temperature: 0 }).text(), 'B');
  await assert.rejects(generate(model, 'a b', { maxTokens: 1 }).text(),
    /^InputError: prompt: characters ' ' are not in the model's vocabulary 'abcdefghijklmnopABCDEFGHIJKLMNOP\?'$/);
  await model.release();
});
