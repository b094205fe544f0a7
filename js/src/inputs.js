// Checking a step's inputs against the spec before anything touches the engine or the state, with the
// one-line messages of wmdeploy/_inputs.py (same order of checks, same words), so that a client sees the
// same error from Python, a server and JS. Typed arrays and tensors must already have the spec's dtype
// (no silent casts: a cast hides a caller's bug and costs a copy per step); plain JS arrays have no dtype
// of their own and are converted when that is lossless in kind, as Python lists are.

import { DTYPES, dtypeOfArray } from './dtypes.js';
import { BATCH, asShape, pyList } from './spec.js';

const KIND_OK = { f: 'biuf', i: 'biu', u: 'biu', b: 'b' }; // spec dtype kind -> plain-array value kinds accepted

const CAST_HINT = {
  float32: 'Float32Array.from(values)', float64: 'Float64Array.from(values)', float16: 'a Uint16Array of float16 bits',
  int64: 'BigInt64Array.from(values, BigInt)', int32: 'Int32Array.from(values)', int8: 'Int8Array.from(values)',
  uint8: 'Uint8Array.from(values)', bool: "new Tensor('bool', Uint8Array.from(values), dims)",
};

export class InputError extends Error {
  constructor(message) {
    super(message);
    this.name = 'InputError';
  }
}

export class ContextLengthError extends InputError {
  constructor(message) {
    super(message);
    this.name = 'ContextLengthError';
  }
}

const isTensorLike = (v) => v && typeof v === 'object' && typeof v.type === 'string' && Array.isArray(v.dims) && 'data' in v;

/** Shape and flat values of a (possibly nested) plain array; null when ragged. */
function flatten(value) {
  const dims = [];
  for (let v = value; Array.isArray(v); v = v[0]) dims.push(v.length);
  const flat = [];
  const walk = (v, depth) => {
    if (depth === dims.length) {
      if (Array.isArray(v)) return false;
      flat.push(v);
      return true;
    }
    if (!Array.isArray(v) || v.length !== dims[depth]) return false;
    return v.every((x) => walk(x, depth + 1));
  };
  return walk(value, 0) ? { dims, flat } : null;
}

/** numpy's dtype for a list of these values: bool, int64 or float64 (or null: not numbers). */
function listKind(values) {
  let kind = 'b';
  for (const v of values) {
    if (typeof v === 'boolean') continue;
    if (typeof v !== 'number' && typeof v !== 'bigint') return null;
    if (typeof v === 'number' && !Number.isInteger(v)) return 'f';
    kind = 'i';
  }
  return kind;
}

const KIND_NAME = { b: 'bool', i: 'int64', f: 'float64' };

function fromList(t, values, dims, where) {
  const kind = listKind(values);
  if (kind === null) throw new InputError(`${where}input '${t.name}': cannot make an array of the given list (values that are not numbers)`);
  const want = DTYPES[t.dtype];
  if (!KIND_OK[want.kind].includes(kind)) {
    throw new InputError(`${where}input '${t.name}': list of ${KIND_NAME[kind]} values, expected ${t.dtype}`);
  }
  const data = new want.array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = typeof values[i] === 'boolean' ? Number(values[i]) : values[i];
    if (want.kind === 'f') {
      const x = Number(v);
      if (t.dtype === 'float16') throw new InputError(`${where}input '${t.name}': a plain list cannot feed float16; pass a Uint16Array of float16 bits`);
      data[i] = x;
      if (!Number.isFinite(data[i]) && Number.isFinite(x)) throw new InputError(`${where}input '${t.name}': value ${x} does not fit ${t.dtype}`);
    } else if (want.array === BigInt64Array) {
      if (typeof v === 'number' && !Number.isSafeInteger(v)) {
        throw new InputError(`${where}input '${t.name}': value ${v} is beyond 2^53 as a JS number; pass a BigInt64Array`);
      }
      const b = BigInt(v);
      if (b < -(2n ** 63n) || b >= 2n ** 63n) throw new InputError(`${where}input '${t.name}': value ${b} does not fit ${t.dtype}`);
      data[i] = b;
    } else {
      const x = Number(v);
      data[i] = x;
      if (data[i] !== x) throw new InputError(`${where}input '${t.name}': value ${x} does not fit ${t.dtype}`);
    }
  }
  return { dtype: t.dtype, dims, data };
}

/** The value's dtype, dims and typed data, or an InputError naming the input. */
function asArray(t, value, where) {
  const got = (dtype) => {
    if (dtype !== t.dtype) {
      throw new InputError(`${where}input '${t.name}': dtype ${dtype}, expected ${t.dtype} ` +
        `(cast it explicitly, e.g. ${CAST_HINT[t.dtype]}; wmdeploy does not cast silently)`);
    }
  };
  if (isTensorLike(value)) {
    got(value.type);
    return { dtype: value.type, dims: value.dims, data: value.data, tensor: value };
  }
  if (Array.isArray(value)) {
    const nested = flatten(value);
    if (!nested) throw new InputError(`${where}input '${t.name}': cannot make an array of the given list (ragged nesting)`);
    return fromList(t, nested.flat, nested.dims, where);
  }
  if (value && typeof value === 'object' && 'data' in value && 'dims' in value) {
    const { data, dims } = value;
    if (!Array.isArray(dims) || !dims.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new InputError(`${where}input '${t.name}': dims ${JSON.stringify(dims)}, expected a list of sizes >= 0`);
    }
    const count = dims.reduce((a, b) => a * b, 1);
    if (data?.length !== count) {
      throw new InputError(`${where}input '${t.name}': ${data?.length ?? 'no'} values for shape ${asShape(dims)} (${count} expected)`);
    }
    if (Array.isArray(data)) return fromList(t, data, dims, where);
    const dtype = dtypeOfArray(data);
    if (dtype === null) throw new InputError(`${where}input '${t.name}': data is ${data?.constructor?.name}, expected a typed array of ${t.dtype}`);
    // a Uint8Array feeds a bool input as it feeds onnxruntime (0/1 bytes); a Uint16Array feeds float16 (its bits)
    got(t.dtype === 'bool' && dtype === 'uint8' ? 'bool' : t.dtype === 'float16' && dtype === 'uint16' ? 'float16' : dtype);
    return { dtype: t.dtype, dims, data };
  }
  const kind = value === null ? 'None' : Array.isArray(value) ? 'list' : typeof value;
  throw new InputError(`${where}input '${t.name}': got ${kind}, expected a Tensor or { data, dims } of ${t.dtype}`);
}

/** (input, bound, what) for every integer input with a known range (as _inputs._bounds). */
function bounds(spec) {
  const out = spec.inputs.filter((t) => t.index_bound).map((t) => [t.name, t.index_bound, 'the rows of the table it indexes']);
  const name = spec.meta.tokens_input;
  const vocab = spec.meta.vocab_size;
  if (name && Number.isInteger(vocab) && vocab > 0) out.push([name, vocab, 'the vocabulary']);
  return out;
}

function checkTokenIds(spec, arrays, where) {
  for (const [name, bound, what] of bounds(spec)) {
    const a = arrays[name];
    if (!a || a.data.length === 0) continue;
    let low = a.data[0];
    let high = a.data[0];
    for (const v of a.data) {
      if (v < low) low = v;
      if (v > high) high = v;
    }
    if (low < 0 || high >= bound) {
      const bad = low < 0 ? low : high;
      throw new InputError(`${where}input '${name}': token id ${bad} is outside ${what} [0, ${bound})`);
    }
  }
}

/**
 * Validate `inputs` (name -> Tensor, { data, dims } or a nested plain array) for a step of `batch` streams
 * (null: taken from the inputs); return { feeds: name -> Tensor, sizes: axis name -> size }.
 * `Tensor` is the engine's tensor class; `where` prefixes messages ("stream 3: ").
 */
export function checkInputs(spec, inputs, batch, Tensor, where = '') {
  if (!inputs || typeof inputs !== 'object') throw new InputError(`${where}inputs: got ${typeof inputs}, expected an object of name -> tensor`);
  const known = spec.inputs.map((t) => t.name);
  const sorted = pyList([...known].sort());
  const unknown = Object.keys(inputs).filter((n) => !known.includes(n));
  if (unknown.length) {
    const fed = new Set([...spec.constants.map((c) => c.name), ...spec.states.map((s) => s.name)]);
    const hint = unknown.some((n) => fed.has(n)) ? ' (constants and states are fed by the runtime)' : '';
    throw new InputError(`${where}input '${unknown[0]}': unknown; expected ${sorted}${hint}`);
  }
  const missing = known.filter((n) => inputs[n] === undefined);
  if (missing.length) throw new InputError(`${where}input '${missing[0]}': missing; expected ${sorted}`);
  const sizes = batch == null ? {} : { [BATCH]: batch };
  const arrays = {};
  for (const t of spec.inputs) {
    const a = asArray(t, inputs[t.name], where);
    if (a.dims.length !== t.shape.length) {
      throw new InputError(`${where}input '${t.name}': rank ${a.dims.length} (shape ${asShape(a.dims)}), expected rank ${t.shape.length} ${asShape(t.shape)}`);
    }
    t.shape.forEach((dim, axis) => {
      const size = a.dims[axis];
      if (typeof dim === 'number') {
        if (size !== dim) {
          throw new InputError(`${where}input '${t.name}': axis ${axis} has size ${size}, expected ${dim} (shape ${asShape(a.dims)} vs ${asShape(t.shape)})`);
        }
        return;
      }
      if (size === 0) throw new InputError(`${where}input '${t.name}': axis ${axis} ('${dim}') is empty, expected at least 1`);
      if (!(dim in sizes)) sizes[dim] = size;
      if (sizes[dim] !== size) {
        const what = dim === BATCH && batch != null ? "the stream's batch" : `'${dim}' of the other inputs`;
        throw new InputError(`${where}input '${t.name}': axis ${axis} ('${dim}') has size ${size}, expected ${sizes[dim]} (${what})`);
      }
    });
    arrays[t.name] = a;
  }
  const cap = spec.maxBatch;
  if (cap != null && (sizes[BATCH] ?? 1) > cap) {
    throw new InputError(`${where}batch ${sizes[BATCH]}: this model's graph fixes its batch at ${cap} (meta.max_batch); ` +
      `step at most ${cap} sequence(s) per call, or use a StreamPool`);
  }
  checkTokenIds(spec, arrays, where);
  const feeds = {};
  for (const [name, a] of Object.entries(arrays)) {
    feeds[name] = a.tensor instanceof Tensor ? a.tensor : new Tensor(DTYPES[a.dtype].ort, a.data, a.dims);
  }
  return { feeds, sizes };
}
