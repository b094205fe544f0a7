// The byte-level pieces that must agree with Python and with standard implementations.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { float16Bits, load, readMetadataProps } from '../src/node.js';
import { pyDumps } from '../src/pyjson.js';
import { sha256 } from '../src/sha256.js';
import { expected, fixtureDir } from './fixtures.js';

const dir = fixtureDir();

test('sha256 equals node:crypto across block boundaries', () => {
  for (const n of [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 4097]) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 31 + 7) & 255);
    assert.equal(Buffer.from(sha256(bytes)).toString('hex'), createHash('sha256').update(bytes).digest('hex'), `${n} bytes`);
  }
});

test("pyDumps writes what Python's json.dumps writes (escapes, separators, sort_keys)", () => {
  const { value, sorted, compact } = expected(dir).pyjson;
  assert.equal(pyDumps(value, { sortKeys: true }), sorted);
  assert.equal(pyDumps(value, { item: ',', key: ':' }), compact);
  assert.throws(() => pyDumps({ x: 0.5 }), /not an integer/);
});

test('metadata_props read from the protobuf bytes; damaged or spec-less files are one line naming the file', async () => {
  const bytes = new Uint8Array(readFileSync(join(dir, 'gru.onnx')));
  const props = readMetadataProps(bytes, 'gru.onnx');
  assert.equal(JSON.parse(props.get('wmdeploy.spec')).states[0].name, 'h');
  await assert.rejects(load(bytes.subarray(0, bytes.length - 7)), /^Error: model: not a readable ONNX model \(a field of \d+ bytes runs past the end at byte \d+\)$/);
  await assert.rejects(load(join(dir, 'missing.onnx')), /missing\.onnx: no such model file$/);
  // the same graph without metadata_props (field 14): every entry dropped by rewriting the top-level fields
  const stripped = [];
  let at = 0;
  while (at < bytes.length) {
    const start = at;
    let tag = 0;
    for (let s = 1; ; s *= 128) { const b = bytes[at++]; tag += (b & 127) * s; if (b < 128) break; }
    let len = 0;
    if ((tag & 7) === 2) { for (let s = 1; ; s *= 128) { const b = bytes[at++]; len += (b & 127) * s; if (b < 128) break; } }
    else if ((tag & 7) === 0) { while (bytes[at++] >= 128); }
    at += len;
    if (Math.floor(tag / 8) !== 14) stripped.push(...bytes.subarray(start, at));
  }
  await assert.rejects(load(Uint8Array.from(stripped)), /^Error: model: no 'wmdeploy\.spec' entry in the model metadata; export it with `wmdeploy export`/);
});

test('float16 bits of initial values round to nearest even', () => {
  const cases = [[0, 0x0000], [1, 0x3c00], [-2, 0xc000], [0.1, 0x2e66], [65504, 0x7bff], [1e6, 0x7c00], [6e-8, 0x0001], [1e-9, 0x0000]];
  for (const [value, bits] of cases) assert.equal(float16Bits(value), bits, `${value}`);
});
