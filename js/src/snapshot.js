// Snapshots: one stream's working memory as self-checking bytes, byte for byte the format of
// wmdeploy/snapshot.py (version 1), so a snapshot moves between Python, a server, Node and a browser:
//
//   0       8  magic "WMSNAP\r\n"
//   8       2  format version, uint16 little-endian (1)
//   10      2  flags, uint16 (0)
//   12      4  header length H, uint32
//   16      H  header: UTF-8 JSON as Python's json.dumps(separators=(",", ":")) writes it:
//              {"layout": <layout hash>, "states": [{"name","dtype","shape","offset","nbytes"}, ...], "meta": {...}}
//   16+H    N  each state's raw bytes, C order, little-endian, in header order
//   end-32 32  SHA-256 of every byte before it
//
// Loading checks, in Python's order and with its messages, before any state is touched: length and magic,
// the checksum (truncation and corruption are refused whole), the version, the header, the layout hash,
// then every tensor's dtype, shape and extent.

import { DTYPES, LITTLE_ENDIAN } from './dtypes.js';
import { pyDumps } from './pyjson.js';
import { asShape, pyList } from './spec.js';
import { sha256 } from './sha256.js';

export const MAGIC = new Uint8Array([0x57, 0x4d, 0x53, 0x4e, 0x41, 0x50, 0x0d, 0x0a]); // b"WMSNAP\r\n"
export const VERSION = 1;
const PREFIX = 16;
const DIGEST = 32;

export class SnapshotError extends Error {
  constructor(message) {
    super(message);
    this.name = 'SnapshotError';
  }
}

if (!LITTLE_ENDIAN) throw new Error('wmdeploy: snapshots are little-endian and this host is not; byte swapping is not implemented');

/** Python's repr of a bytes object, for the bad-magic message. */
function bytesRepr(bytes) {
  let out = "b'";
  for (const b of bytes) {
    if (b === 0x5c) out += '\\\\';
    else if (b === 0x27) out += "\\'";
    else if (b === 0x0a) out += '\\n';
    else if (b === 0x0d) out += '\\r';
    else if (b === 0x09) out += '\\t';
    else if (b >= 0x20 && b < 0x7f) out += String.fromCharCode(b);
    else out += '\\x' + b.toString(16).padStart(2, '0');
  }
  return out + "'";
}

const rawBytes = (data) => new Uint8Array(data.buffer, data.byteOffset, data.byteLength);

/**
 * Serialise one stream's states: `states` maps each state name to { data (typed array), dims } at the
 * same batch b; `meta` is free-form JSON of integers and strings (the runtime writes { steps }).
 */
export function dumps(spec, states, meta = {}) {
  const entries = [];
  const chunks = [];
  let offset = 0;
  for (const s of spec.states) {
    const { data, dims } = states[s.name];
    const batch = dims[s.batchAxis];
    const want = spec.stateDims(s, batch);
    if (asShape(dims) !== asShape(want)) {
      throw new SnapshotError(`state '${s.name}': shape ${asShape(dims)}, expected ${asShape(want)}`);
    }
    const raw = rawBytes(data);
    entries.push({ name: s.name, dtype: DTYPES[s.dtype].numpy, shape: dims, offset, nbytes: raw.length });
    chunks.push(raw);
    offset += raw.length;
  }
  const header = new TextEncoder().encode(pyDumps({ layout: spec.layoutHash, states: entries, meta }, { item: ',', key: ':' }));
  const total = PREFIX + header.length + offset + DIGEST;
  const out = new Uint8Array(total);
  out.set(MAGIC, 0);
  const view = new DataView(out.buffer);
  view.setUint16(8, VERSION, true);
  view.setUint16(10, 0, true);
  view.setUint32(12, header.length, true);
  out.set(header, PREFIX);
  let at = PREFIX + header.length;
  for (const raw of chunks) {
    out.set(raw, at);
    at += raw.length;
  }
  out.set(sha256(out.subarray(0, at)), at);
  return out;
}

function asBytes(blob) {
  if (blob instanceof Uint8Array) return blob;
  if (blob instanceof ArrayBuffer) return new Uint8Array(blob);
  if (ArrayBuffer.isView(blob)) return rawBytes(blob);
  const kind = blob === null ? 'null' : blob?.constructor?.name ?? typeof blob;
  throw new SnapshotError(`snapshot: got ${kind}, expected bytes (a Uint8Array or ArrayBuffer)`);
}

/** Verify framing and checksum; return { header, block } (block: the tensor bytes). */
export function readHeader(blob) {
  const bytes = asBytes(blob);
  if (bytes.length < PREFIX + DIGEST) {
    throw new SnapshotError(`snapshot: ${bytes.length} bytes is too short to be a snapshot (truncated?)`);
  }
  if (!MAGIC.every((b, i) => bytes[i] === b)) {
    throw new SnapshotError(`snapshot: bad magic ${bytesRepr(bytes.subarray(0, 8))}, expected ${bytesRepr(MAGIC)} (not a wmdeploy snapshot)`);
  }
  const digest = sha256(bytes.subarray(0, bytes.length - DIGEST));
  if (!digest.every((b, i) => bytes[bytes.length - DIGEST + i] === b)) {
    throw new SnapshotError(`snapshot: checksum mismatch over ${bytes.length} bytes (truncated or corrupted)`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = view.getUint16(8, true);
  if (version !== VERSION) throw new SnapshotError(`snapshot: format version ${version}, this wmdeploy reads version ${VERSION}`);
  const hlen = view.getUint32(12, true);
  const end = PREFIX + hlen;
  if (end > bytes.length - DIGEST) throw new SnapshotError(`snapshot: header length ${hlen} runs past the end`);
  let header;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(PREFIX, end)));
  } catch (err) {
    throw new SnapshotError(`snapshot: header is not valid JSON (${err.message})`);
  }
  if (!header || typeof header !== 'object' || Array.isArray(header) || !Array.isArray(header.states)) {
    throw new SnapshotError("snapshot: header lacks a 'states' list");
  }
  return { header, block: bytes.subarray(end, bytes.length - DIGEST) };
}

/**
 * The states in `blob` after every check against `spec`: { states: name -> { data, dims }, batch, steps }.
 * Nothing is half-loaded: a refused snapshot throws before the caller changes anything.
 */
export function loads(spec, blob) {
  const { header, block } = readHeader(blob);
  if (header.layout !== spec.layoutHash) {
    const have = header.states.filter((e) => e && typeof e === 'object').map((e) => e.name);
    throw new SnapshotError(`snapshot: state layout hash ${String(header.layout).slice(0, 12)}... (states ${pyList(have)}) ` +
      `does not match this model's ${spec.layoutHash.slice(0, 12)}... (states ${pyList(spec.states.map((s) => s.name))})`);
  }
  const entries = new Map(header.states.filter((e) => e && typeof e === 'object').map((e) => [e.name, e]));
  const states = {};
  let batch = null;
  for (const s of spec.states) {
    const e = entries.get(s.name);
    if (!e) throw new SnapshotError(`snapshot: state '${s.name}' is missing`);
    const { dtype, shape, offset, nbytes } = e;
    if (typeof dtype !== 'string' || !Array.isArray(shape) || !shape.every(Number.isInteger) ||
        !Number.isInteger(offset) || !Number.isInteger(nbytes)) {
      throw new SnapshotError(`snapshot: state '${s.name}' has a malformed entry`);
    }
    if (batch === null && shape.length === s.shape.length) batch = shape[s.batchAxis];
    // numpy writes '<' (or '|' for one-byte types); '=' is native, little-endian here
    const sameType = dtype.replace(/^[<=|]/, '') === DTYPES[s.dtype].numpy.slice(1);
    if (!sameType || batch === null || batch < 1 || asShape(shape) !== asShape(spec.stateDims(s, batch))) {
      throw new SnapshotError(`snapshot: state '${s.name}' is ${dtype} ${asShape(shape)}, expected ${s.dtype} ${asShape(s.shape)}`);
    }
    const perStream = DTYPES[s.dtype].size * spec.stateDims(s, 1).reduce((a, b) => a * b, 1);
    if (nbytes !== perStream * batch || offset < 0 || offset + nbytes > block.length) {
      throw new SnapshotError(`snapshot: state '${s.name}' spans bytes ${offset}..${offset + nbytes} of a ${block.length}-byte tensor block`);
    }
    // a copy: owned, and aligned for the typed array (an offset need not be a multiple of 8)
    const copy = block.slice(offset, offset + nbytes);
    states[s.name] = { data: new DTYPES[s.dtype].array(copy.buffer), dims: shape };
  }
  return { states, batch: batch ?? 1, steps: stepsOf(header) };
}

/** The step count in a snapshot's meta, checked (a re-checksummed snapshot can carry any JSON there). */
function stepsOf(header) {
  const meta = header.meta ?? {};
  if (typeof meta !== 'object' || Array.isArray(meta)) throw new SnapshotError("snapshot: its header's 'meta' is not an object");
  const steps = meta.steps ?? 0;
  if (!Number.isInteger(steps) || steps < 0) {
    throw new SnapshotError(`snapshot: meta.steps ${JSON.stringify(steps).slice(0, 20)}, expected a step count >= 0`);
  }
  return steps;
}

/** The free-form meta of a (checksum-verified) snapshot, e.g. { steps: 12 }. */
export function snapshotMeta(blob) {
  return { ...(readHeader(blob).header.meta ?? {}) };
}
