// The streaming contract as the JS runtime reads it (wmdeploy/contract.py): the spec JSON from the file's
// metadata_props, the state shapes at a batch size, and the layout hash a snapshot must match.

import { DTYPES } from './dtypes.js';
import { pyDumps } from './pyjson.js';
import { sha256Hex } from './sha256.js';

export const METADATA_KEY = 'wmdeploy.spec';
export const BATCH = 'batch';
const FORMAT_NAME = 'wmdeploy.spec';
const FORMAT_VERSION = 1;

/** Python's repr() of a string (single quotes unless it holds one and no double quote), for messages. */
export function pyRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  const body = text.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/\r/g, '\\r').replace(/\t/g, '\\t');
  return quote + (quote === "'" ? body.replace(/'/g, "\\'") : body) + quote;
}

/** Python's repr() of a list of strings: ['a', 'b']. */
export const pyList = (names) => '[' + names.map(pyRepr).join(', ') + ']';

/** A shape as Python's as_shape() writes it: [batch, time, 3]. */
export const asShape = (dims) => '[' + dims.join(', ') + ']';

function fail(source, what) {
  return new Error(`${source}: the '${METADATA_KEY}' metadata is invalid: ${what}`);
}

function checkTensor(entry, role, source) {
  if (!entry || typeof entry.name !== 'string' || !entry.name) throw fail(source, `a ${role} has no name`);
  const owner = `${role === 'state' ? 'state' : 'tensor'} '${entry.name}'`;
  if (!(entry.dtype in DTYPES)) {
    throw fail(source, `${owner}: unknown dtype ${pyRepr(String(entry.dtype))}; expected one of ${Object.keys(DTYPES).join(', ')}`);
  }
  if (!Array.isArray(entry.shape) || entry.shape.filter((d) => d === BATCH).length !== 1) {
    throw fail(source, `${owner}: shape ${JSON.stringify(entry.shape)} needs exactly one '${BATCH}' axis`);
  }
  for (const [axis, d] of entry.shape.entries()) {
    const ok = (Number.isInteger(d) && d > 0) || (typeof d === 'string' && d !== '');
    if (!ok || (role === 'state' && typeof d === 'string' && d !== BATCH)) {
      throw fail(source, `${owner}: axis ${axis} is ${JSON.stringify(d)}; expected ${role === 'state' ? 'a positive int or' : 'a positive int or an axis name like'} '${BATCH}'`);
    }
  }
  return { ...entry, batchAxis: entry.shape.indexOf(BATCH) };
}

/** The spec of a file: plain data (the JSON as Python wrote it) plus what the runtime derives from it. */
export class Spec {
  constructor(json, source = 'model') {
    if (!json || typeof json !== 'object' || Array.isArray(json)) throw fail(source, 'expected an object');
    if (json.format !== FORMAT_NAME) throw fail(source, `field 'format' is ${JSON.stringify(json.format)}; expected '${FORMAT_NAME}'`);
    if (json.version !== FORMAT_VERSION) {
      throw fail(source, `field 'version' is ${JSON.stringify(json.version)}; this wmdeploy reads version ${FORMAT_VERSION} (a newer file needs a newer wmdeploy)`);
    }
    this.json = json;
    this.inputs = (json.inputs || []).map((t) => checkTensor(t, 'input', source));
    this.outputs = (json.outputs || []).map((t) => checkTensor(t, 'output', source));
    this.states = (json.states || []).map((s) => {
      const state = checkTensor(s, 'state', source);
      return { ...state, output: s.output || `${s.name}_out`, init: s.init ?? 0, inplace: s.inplace === true };
    });
    this.constants = (json.constants || []).map((c) => {
      if (!(c.dtype in DTYPES)) throw fail(source, `constant '${c.name}': unknown dtype ${pyRepr(String(c.dtype))}`);
      return { ...c };
    });
    this.chunkInvariant = Boolean(json.chunk_invariant);
    this.meta = json.meta && typeof json.meta === 'object' ? json.meta : {};
    this.layoutHash = sha256Hex(
      pyDumps(this.states.map((s) => [s.name, s.output, s.dtype, s.shape]), { sortKeys: true }),
    );
  }

  /** The most streams one engine call may carry (meta.max_batch), or null for no limit. */
  get maxBatch() {
    return this.meta.max_batch ?? null;
  }

  input(name) {
    const t = this.inputs.find((i) => i.name === name);
    if (!t) throw new Error(`spec: no data input named '${name}'; inputs are ${pyList(this.inputs.map((i) => i.name))}`);
    return t;
  }

  output(name) {
    const t = this.outputs.find((o) => o.name === name);
    if (!t) throw new Error(`spec: no data output named '${name}'; outputs are ${pyList(this.outputs.map((o) => o.name))}`);
    return t;
  }

  /** A state's dims at `batch` streams. */
  stateDims(state, batch) {
    return state.shape.map((d) => (d === BATCH ? batch : d));
  }

  /** Bytes of state one stream holds. */
  get stateBytesPerStream() {
    return this.states.reduce((sum, s) => sum + DTYPES[s.dtype].size * this.stateDims(s, 1).reduce((a, b) => a * b, 1), 0);
  }

  toJSON() {
    return this.json;
  }
}

/** The spec in a file's metadata_props (a Map), or one line naming the file and what is wrong. */
export function specFromMetadata(props, source) {
  if (!props.has(METADATA_KEY)) {
    throw new Error(`${source}: no '${METADATA_KEY}' entry in the model metadata; export it with \`wmdeploy export\` or adopt it with \`wmdeploy annotate\``);
  }
  let json;
  try {
    json = JSON.parse(props.get(METADATA_KEY));
  } catch (err) {
    throw fail(source, `not valid JSON (${err.message})`);
  }
  return new Spec(json, source);
}
