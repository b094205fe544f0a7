// The streaming runtime, engine-agnostic: a Model (spec + onnxruntime session), Streams that carry their
// state from one step to the next, and a StreamPool that steps many streams in batched engine calls. The
// entry points (node.js, browser.js) hand it their onnxruntime module; nothing here imports one.
//
// State never round-trips through user code. Where the engine writes preallocated outputs (onnxruntime-node),
// each Stream keeps two buffers per state and passes the idle one as the run's output (onnxruntime's JS API
// has no IO binding, but run() takes preallocated outputs): step k's output is step k+1's input, nothing is
// allocated per step, and no buffer is input and output of one run. onnxruntime-web 1.31's WASM backend
// returns a preallocated CPU output unwritten (zeros: the recall model then forgot everything), so there the
// engine's own output tensor becomes the next input.

import { ContextLengthError, InputError, checkInputs } from './inputs.js';
import { readMetadataProps } from './protobuf.js';
import { dumps, loads } from './snapshot.js';
import { specFromMetadata } from './spec.js';
import { DTYPES } from './dtypes.js';
import { concat, constantArray, initialState, split } from './tensors.js';

/** A language model's positions and context capacity (meta.position_state / max_context), as _inputs.ContextBound. */
class ContextBound {
  constructor(spec) {
    this.capacity = spec.meta.max_context != null ? Number(spec.meta.max_context) : null;
    this.state = String(spec.meta.position_state);
    this.tokens = spec.input(String(spec.meta.tokens_input ?? spec.inputs[0].name));
    this.timeAxis = this.tokens.shape.indexOf('time');
  }

  static of(spec) {
    return 'position_state' in spec.meta ? new ContextBound(spec) : null;
  }

  /** The step's token count; ContextLengthError when a row would pass the capacity. */
  check(held, feeds, where = '') {
    const t = this.timeAxis >= 0 ? feeds[this.tokens.name].dims[this.timeAxis] : 1;
    if (this.capacity !== null && held + t > this.capacity) {
      throw new ContextLengthError(`${where}${held} tokens held + ${t} new would pass the context capacity of ${this.capacity} tokens ` +
        "(the file's --max-context); nothing ran, the stream is unchanged");
    }
    return t;
  }

  /** The most tokens any row of restored states holds, checked against the capacity. */
  position(states) {
    const values = Array.from(states[this.state].data, Number);
    const low = Math.min(...values);
    const high = Math.max(...values);
    if (values.length && (low < 0 || (this.capacity !== null && high > this.capacity))) {
      throw new InputError(`snapshot: state '${this.state}' holds position ${low < 0 ? low : high}, outside 0..${this.capacity ?? 'any'}`);
    }
    return values.length ? high : 0;
  }
}

export class Model {
  /** Use load() from the package entry; this takes a created session and the file's spec. */
  constructor(ort, session, spec, source, { preallocate = false } = {}) {
    this.ort = ort;
    this.preallocate = preallocate;
    this.session = session;
    this.spec = spec;
    this.source = source;
    this.constants = Object.fromEntries(spec.constants.map((c) => {
      const { data, dims } = constantArray(c);
      return [c.name, new ort.Tensor(DTYPES[c.dtype].ort, data, dims)];
    }));
    this.bound = ContextBound.of(spec);
  }

  /** A fresh working memory (the spec's initial values), or one resumed from a snapshot (Uint8Array). */
  stream({ batch = 1, snapshot = null } = {}) {
    return new Stream(this, { batch, snapshot });
  }

  /** Streams stepped together, one engine call per distinct input shape; at most `capacity` (null: no limit). */
  pool({ capacity = null } = {}) {
    return new StreamPool(this, { capacity });
  }

  /** One engine call: `feeds` (data inputs as Tensors), `states` (name -> Tensor), `fetches` (output -> a preallocated
   * Tensor to write into; every other output is made by the engine). */
  async run(feeds, states, fetches = {}) {
    const all = { ...feeds, ...this.constants, ...states };
    const names = [...this.spec.outputs.map((o) => o.name), ...this.spec.states.map((s) => s.output)];
    const wanted = { ...Object.fromEntries(names.map((n) => [n, null])), ...fetches };
    return this.session.run(all, wanted);
  }

  async release() {
    await this.session.release();
  }
}

/** Create a Model from the bytes of an ONNX file (`source` names it in messages). */
export async function createModel(ort, bytes, source, sessionOptions = {}, { preallocate = false } = {}) {
  const spec = specFromMetadata(readMetadataProps(bytes, source), source);
  const inplace = spec.states.find((s) => s.inplace);
  if (inplace) {
    throw new Error(`${source}: state '${inplace.name}' is written in place (its output aliases its input); onnxruntime's JS API ` +
      'cannot bind one buffer as both, so export the file with `--attention portable`');
  }
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, sessionOptions);
  } catch (err) {
    throw new Error(`${source}: onnxruntime cannot open it (${String(err.message ?? err).split('\n')[0]})`);
  }
  const wanted = [...spec.inputs.map((t) => t.name), ...spec.constants.map((c) => c.name), ...spec.states.map((s) => s.name)];
  const absent = wanted.filter((n) => !session.inputNames.includes(n));
  const absentOut = [...spec.outputs.map((t) => t.name), ...spec.states.map((s) => s.output)].filter((n) => !session.outputNames.includes(n));
  if (absent.length || absentOut.length) {
    await session.release();
    const what = absent.length ? `input '${absent[0]}'` : `output '${absentOut[0]}'`;
    throw new Error(`${source}: its spec names ${what}, which the graph does not have`);
  }
  return new Model(ort, session, spec, source, { preallocate });
}

/** One working memory moving forward step by step (`batch` independent sequences in lock step). */
export class Stream {
  constructor(model, { batch = 1, snapshot = null } = {}) {
    this.model = model;
    this.spec = model.spec;
    let restored = null;
    this.steps = 0;
    if (snapshot != null) {
      restored = loads(this.spec, snapshot); // every check before anything is allocated
      if (this.spec.states.length) batch = restored.batch;
    }
    if (!Number.isInteger(batch) || batch < 1) throw new InputError(`stream batch ${batch}: expected at least 1`);
    this.batch = batch;
    this.position = restored && model.bound ? model.bound.position(restored.states) : 0;
    const { Tensor } = model.ort;
    // `current` is the next step's input; `spare` (engines that write preallocated outputs) its output
    this.current = {};
    this.spare = {};
    for (const s of this.spec.states) {
      const fresh = restored ? restored.states[s.name] : initialState(this.spec, s, batch);
      this.current[s.name] = new Tensor(DTYPES[s.dtype].ort, fresh.data, fresh.dims);
      if (model.preallocate) this.spare[s.name] = new Tensor(DTYPES[s.dtype].ort, new DTYPES[s.dtype].array(fresh.data.length), fresh.dims);
    }
    if (restored) this.steps = restored.steps;
    this.running = false;
  }

  /** Feed one chunk (name -> Tensor, { data, dims } or nested array); resolve to the data outputs (name -> Tensor).
   * The state moves on only if the step succeeds. */
  async step(inputs) {
    if (this.running) throw new InputError('stream: a step is already running; await it before the next (one stream is one sequence)');
    const { feeds } = checkInputs(this.spec, inputs, this.batch, this.model.ort.Tensor);
    const t = this.model.bound ? this.model.bound.check(this.position, feeds) : 0;
    this.running = true;
    let result;
    try {
      const fetches = this.model.preallocate ? Object.fromEntries(this.spec.states.map((s) => [s.output, this.spare[s.name]])) : {};
      result = await this.model.run(feeds, this.current, fetches);
    } finally {
      this.running = false;
    }
    for (const s of this.spec.states) {
      // the output is the spare buffer (written in place where the engine can) or a tensor the engine made
      const next = result[s.output];
      if (this.model.preallocate) this.spare[s.name] = this.current[s.name];
      this.current[s.name] = next;
    }
    this.steps += 1;
    this.position += t;
    return Object.fromEntries(this.spec.outputs.map((o) => [o.name, result[o.name]]));
  }

  /** Back to the initial state (a new conversation). */
  reset() {
    for (const s of this.spec.states) {
      const fresh = initialState(this.spec, s, this.batch);
      this.current[s.name] = new this.model.ort.Tensor(DTYPES[s.dtype].ort, fresh.data, fresh.dims);
    }
    this.steps = 0;
    this.position = 0;
  }

  /** A copy of the working memory: state name -> { data, dims }. */
  get state() {
    return Object.fromEntries(this.spec.states.map((s) => {
      const t = this.current[s.name];
      return [s.name, { data: t.data.slice(), dims: [...t.dims] }];
    }));
  }

  /** The working memory as self-checking bytes (the Python snapshot format); resume with model.stream({ snapshot }). */
  snapshot() {
    return dumps(this.spec, this.state, { steps: this.steps });
  }
}

/** Streams, each with its own working memory, stepped in batched engine calls (see runtime.d.ts). */
export class StreamPool {
  constructor(model, { capacity = null } = {}) {
    if (capacity !== null && (!Number.isInteger(capacity) || capacity < 1)) {
      throw new InputError(`pool capacity ${capacity}: expected at least 1, or null for no limit`);
    }
    this.model = model;
    this.spec = model.spec;
    this.capacity = capacity;
    this.members = new Map(); // sid -> { states: name -> { data, dims } (batch 1), steps, position }
    this.nextId = 0;
  }

  get size() {
    return this.members.size;
  }

  get sids() {
    return [...this.members.keys()];
  }

  has(sid) {
    return this.members.has(sid);
  }

  member(sid) {
    const m = this.members.get(sid);
    if (!m) throw new InputError(`stream ${sid}: not in this pool (it left, or was never joined)`);
    return m;
  }

  /** Add a stream (fresh, or resumed from a one-stream snapshot); return its id. A refused snapshot takes no slot. */
  join(snapshot = null) {
    if (this.capacity !== null && this.members.size >= this.capacity) {
      throw new InputError(`pool: all ${this.capacity} slots are taken; leave a stream or make a bigger pool`);
    }
    let states;
    let steps = 0;
    let position = 0;
    if (snapshot != null) {
      const restored = loads(this.spec, snapshot);
      if (restored.batch !== 1) throw new InputError('snapshot: holds several streams; a pool member takes a one-stream snapshot');
      ({ states, steps } = restored);
      position = this.model.bound ? this.model.bound.position(states) : 0;
    } else {
      states = Object.fromEntries(this.spec.states.map((s) => [s.name, initialState(this.spec, s, 1)]));
    }
    const sid = this.nextId++;
    this.members.set(sid, { states, steps, position });
    return sid;
  }

  leave(sid) {
    this.member(sid);
    this.members.delete(sid);
  }

  reset(sid) {
    const m = this.member(sid);
    m.states = Object.fromEntries(this.spec.states.map((s) => [s.name, initialState(this.spec, s, 1)]));
    m.steps = 0;
    m.position = 0;
  }

  state(sid) {
    const m = this.member(sid);
    return Object.fromEntries(Object.entries(m.states).map(([k, v]) => [k, { data: v.data.slice(), dims: [...v.dims] }]));
  }

  /** The stream's working memory, in the same format as Stream.snapshot (batch 1). */
  snapshot(sid) {
    const m = this.member(sid);
    return dumps(this.spec, m.states, { steps: m.steps });
  }

  /**
   * Step the streams in `requests` (a Map or object: sid -> inputs with a batch axis of 1); resolve to
   * sid -> outputs. All-or-nothing: every request is checked before any engine call, and the new states
   * are committed only after every engine call (one per distinct input shape) has succeeded.
   */
  async step(requests) {
    const entries = requests instanceof Map ? [...requests] : Object.entries(requests).map(([k, v]) => [Number(k), v]);
    const { Tensor } = this.model.ort;
    const groups = new Map();
    for (const [sid, inputs] of entries) {
      const m = this.member(sid);
      const where = `stream ${sid}: `;
      const { feeds } = checkInputs(this.spec, inputs, 1, Tensor, where);
      const advance = this.model.bound ? this.model.bound.check(m.position, feeds, where) : 0;
      const key = this.spec.inputs.map((t) => feeds[t.name].dims.join(',')).join(';');
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push({ sid, m, feeds, advance });
    }
    const cap = this.spec.maxBatch ?? Infinity; // a fixed-batch graph (meta.max_batch): at most that many per call
    const calls = [];
    for (const members of groups.values()) {
      for (let i = 0; i < members.length; i += cap) calls.push(members.slice(i, i + cap));
    }
    const done = [];
    for (const members of calls) {
      const n = members.length;
      const feeds = {};
      for (const t of this.spec.inputs) {
        const joined = concat(members.map((x) => ({ data: x.feeds[t.name].data, dims: x.feeds[t.name].dims })), t.batchAxis);
        feeds[t.name] = new Tensor(DTYPES[t.dtype].ort, joined.data, joined.dims);
      }
      const states = {};
      for (const s of this.spec.states) {
        const joined = concat(members.map((x) => x.m.states[s.name]), s.batchAxis);
        states[s.name] = new Tensor(DTYPES[s.dtype].ort, joined.data, joined.dims);
      }
      const result = await this.model.run(feeds, states);
      const outs = Object.fromEntries(this.spec.outputs.map((o) => [o.name, split(result[o.name], o.batchAxis, n)]));
      const next = Object.fromEntries(this.spec.states.map((s) => [s.name, split(result[s.output], s.batchAxis, n)]));
      done.push({ members, outs, next });
    }
    // every engine call succeeded: commit (a failure above left every stream as it was)
    const results = new Map();
    for (const { members, outs, next } of done) {
      members.forEach((x, i) => {
        for (const s of this.spec.states) x.m.states[s.name] = next[s.name][i];
        x.m.steps += 1;
        x.m.position += x.advance;
        results.set(x.sid, Object.fromEntries(this.spec.outputs.map((o) => {
          const piece = outs[o.name][i];
          return [o.name, new Tensor(DTYPES[o.dtype].ort, piece.data, piece.dims)];
        })));
      });
    }
    return results;
  }
}

