// Where the tests find the files the Python side made (js/test/make_fixtures.py): WMDEPLOY_FIXTURES when
// tests/test_js.py runs them (it made them in the same pytest run and checks what they write back), else
// a fresh directory made now with the repository's Python (.venv, as the README's set-up leaves it).

import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..');

export function fixtureDir() {
  if (process.env.WMDEPLOY_FIXTURES) return process.env.WMDEPLOY_FIXTURES;
  const venv = join(root, '.venv', 'bin', 'python');
  const python = existsSync(venv) ? venv : 'python3';
  const dir = mkdtempSync(join(tmpdir(), 'wmdeploy-js-'));
  execFileSync(python, [join(here, 'make_fixtures.py'), dir], { stdio: ['ignore', 'ignore', 'inherit'] });
  process.env.WMDEPLOY_FIXTURES = dir; // one set per process, removed when it exits
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function expected(dir) {
  return JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8'));
}

/** A fixture tensor ({ dtype, dims, data } as Python wrote it) as { data (typed), dims }. */
export function typed({ dtype, dims, data }) {
  const arrays = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array, float64: Float64Array };
  const Array_ = arrays[dtype];
  return { data: Array_ === BigInt64Array ? BigInt64Array.from(data, BigInt) : Array_.from(data), dims };
}

/** The largest |a - b| - rtol |b| over two tensors' values, after checking their dims agree. */
export function maxDiff(tensor, want, rtol = 0) {
  if (tensor.dims.join() !== want.dims.join()) throw new Error(`dims ${tensor.dims} vs ${want.dims}`);
  let worst = 0;
  want.data.forEach((v, i) => {
    worst = Math.max(worst, Math.abs(Number(tensor.data[i]) - v) - rtol * Math.abs(v));
  });
  return worst;
}
