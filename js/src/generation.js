// Text generation from a streaming language model (wmdeploy/generation.py): prefill the prompt in chunks,
// then sample one token per step; the whole conversation lives in the stream's state and is never re-fed.
// The file says everything needed: spec meta names the token input, the logits output and the vocabulary
// (kind "bytes", or "chars" with the characters in id order). A file that carries a Hugging Face tokenizer
// (kind "hf") or none ("ids") generates from token ids. Greedy decoding (temperature 0) gives Python's
// tokens; sampling uses a seeded JS generator, so a seed does not reproduce numpy's draws.

import { ContextLengthError, InputError } from './inputs.js';
import { pyRepr } from './spec.js';

export const PREFILL_CHUNK = 64;
export const BOUNDED_PREFILL_CHUNK = 512;

/** Byte or character vocabulary, as declared in the model's metadata (kinds "hf" and "ids": token ids only). */
export class Tokenizer {
  constructor(vocab, vocabSize) {
    this.kind = vocab?.kind;
    this.vocabSize = vocabSize;
    this.eosTokenIds = new Set((vocab?.eos_token_ids ?? []).map(Number));
    if (this.kind === 'bytes') {
      if (vocabSize < 256) throw new Error(`vocab: kind 'bytes' needs vocab_size >= 256, the spec says ${vocabSize}`);
    } else if (this.kind === 'chars') {
      this.chars = Array.from(String(vocab.chars ?? ''));
      if (!this.chars.length) throw new Error("vocab: kind 'chars' needs the characters in id order under 'chars'");
      this.index = new Map(this.chars.map((c, i) => [c, i]));
    } else if (this.kind !== 'hf' && this.kind !== 'ids') {
      throw new Error(`vocab: kind ${pyRepr(String(this.kind))} cannot turn text into tokens; expected 'bytes', 'chars' or 'hf'`);
    }
  }

  /** Token ids of `text`. */
  encode(text) {
    if (this.kind === 'bytes') return Array.from(new TextEncoder().encode(text));
    if (this.kind === 'chars') {
      const unknown = [...new Set(Array.from(text).filter((c) => !this.index.has(c)))].sort();
      if (unknown.length) {
        throw new InputError(`prompt: characters ${pyRepr(unknown.join(''))} are not in the model's vocabulary ${pyRepr(this.chars.join(''))}`);
      }
      return Array.from(text, (c) => this.index.get(c));
    }
    throw new InputError(`prompt: this file's vocabulary (kind '${this.kind}') is not read by the JS runtime; pass token ids instead of text`);
  }

  /** decode(token) -> text piece; a multi-byte UTF-8 character appears once all its bytes have arrived. */
  decoder() {
    if (this.kind === 'bytes') {
      const utf8 = new TextDecoder('utf-8');
      return (token) => (token < 256 ? utf8.decode(new Uint8Array([token]), { stream: true }) : '');
    }
    return (token) => (this.chars && token < this.chars.length ? this.chars[token] : '');
  }

  decode(ids) {
    const piece = this.decoder();
    return ids.map((t) => piece(Number(t))).join('');
  }
}

/** What generation needs from a spec, or one line naming what is missing. */
export function languageModelInfo(spec, source = 'model') {
  const meta = spec.meta;
  const missing = ['tokens_input', 'logits_output', 'vocab'].filter((k) => !(k in meta));
  if (missing.length) {
    throw new Error(`${source} is not a language model wmdeploy can generate from: its spec meta lacks ${missing.map((m) => `'${m}'`).join(', ')}`);
  }
  const tokens = spec.input(meta.tokens_input);
  const logits = spec.output(meta.logits_output);
  if (!['int64', 'int32'].includes(tokens.dtype) || tokens.shape.join() !== 'batch,time') {
    throw new Error(`${source}: token input '${tokens.name}' is ${tokens.dtype} [${tokens.shape.join(', ')}]; expected integer ['batch', 'time']`);
  }
  if (logits.shape.length !== 3 || logits.shape[0] !== 'batch' || logits.shape[1] !== 'time') {
    throw new Error(`${source}: logits output '${logits.name}' is [${logits.shape.join(', ')}]; expected ['batch', 'time', vocab]`);
  }
  const vocabSize = Number(meta.vocab_size ?? (Number.isInteger(logits.shape[2]) ? logits.shape[2] : 0));
  const capacity = meta.max_context && 'position_state' in meta ? Number(meta.max_context) : null;
  const maxChunk = Number(meta.max_chunk) || (capacity ? BOUNDED_PREFILL_CHUNK : PREFILL_CHUNK);
  return { tokens, logits, tokenizer: new Tokenizer(meta.vocab, vocabSize), maxChunk, capacity, vocabSize };
}

/** A seeded uniform generator in [0, 1) (mulberry32); Math.random when `seed` is null. */
export function rng(seed) {
  if (seed == null) return Math.random;
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One token id from a logits vector: greedy at temperature 0, else top-k / nucleus sampling. */
export function sample(logits, random, { temperature = 1, topK = 0, topP = 1 } = {}) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (temperature <= 0) return best;
  let z = Array.from(logits, (v) => v / temperature);
  if (topK > 0 && topK < z.length) {
    const kth = [...z].sort((a, b) => b - a)[topK - 1];
    z = z.map((v) => (v < kth ? -Infinity : v));
  }
  const top = Math.max(...z);
  let p = z.map((v) => Math.exp(v - top));
  const total = p.reduce((a, b) => a + b, 0);
  p = p.map((v) => v / total);
  if (topP < 1) {
    const order = p.map((_, i) => i).sort((a, b) => p[b] - p[a]);
    const keep = new Set();
    let cumulative = 0;
    for (const i of order) {
      keep.add(i);
      cumulative += p[i];
      if (cumulative >= topP) break;
    }
    p = p.map((v, i) => (keep.has(i) ? v : 0));
  }
  const mass = p.reduce((a, b) => a + b, 0);
  let u = random() * mass;
  for (let i = 0; i < p.length; i++) {
    u -= p[i];
    if (u < 0) return i;
  }
  return best;
}

/** The last time step's logits of row 0 (a [1, time, vocab] tensor). */
function lastLogits(tensor) {
  const [, time, vocab] = tensor.dims;
  return tensor.data.subarray((time - 1) * vocab, time * vocab);
}

/**
 * Continue `prompt` (text, or token ids) on `modelOrStream` (a Stream, or a Model: a fresh stream).
 * Iterate it (for await) for text pieces; `tokens` and `finishReason` ("stop": an eos id or `stop`;
 * "length": maxTokens or the context) fill in as it runs; `await text()` runs it whole.
 */
export function generate(modelOrStream, prompt, { maxTokens = 100, temperature = 1, topK = 0, topP = 1, seed = null, stop = null } = {}) {
  if (!(topP > 0 && topP <= 1)) throw new InputError(`topP: ${topP}; expected a probability in (0, 1]`);
  if (!(temperature >= 0 && temperature < Infinity)) throw new InputError(`temperature: ${temperature}; expected 0 (greedy) or a positive finite number`);
  if (!(maxTokens >= 0) || !(topK >= 0)) throw new InputError(`maxTokens/topK: expected non-negative values, got ${maxTokens}/${topK}`);
  const stream = typeof modelOrStream.pool === 'function' ? modelOrStream.stream() : modelOrStream;
  if (stream.batch !== 1) throw new InputError(`stream batch ${stream.batch}: generation streams one sequence (batch 1)`);
  const info = languageModelInfo(stream.spec, stream.model.source);
  const { Tensor } = stream.model.ort;
  const step = (ids) => stream.step({ [info.tokens.name]: new Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]) });
  const generation = {
    stream,
    tokens: [],
    finishReason: null,
    async *[Symbol.asyncIterator]() {
      let ids = prompt;
      if (typeof prompt === 'string') ids = info.tokenizer.encode(prompt);
      else if (!Array.isArray(prompt) || prompt.some((t) => !Number.isInteger(t) || t < 0 || (info.vocabSize && t >= info.vocabSize))) {
        throw new InputError(`prompt: token ids ${JSON.stringify(Array.isArray(prompt) ? prompt.slice(0, 5) : prompt)} are not in the vocabulary (0..${info.vocabSize - 1})`);
      }
      if (!ids.length) throw new InputError('prompt: empty; generation needs at least one token to condition on');
      let held = info.capacity !== null ? stream.position : 0;
      if (info.capacity !== null && held + ids.length > info.capacity) {
        throw new ContextLengthError(`prompt: ${ids.length} tokens${held ? ` + ${held} already held` : ''} would pass the context capacity of ${info.capacity} tokens (the file's --max-context); nothing ran`);
      }
      const size = info.capacity === null ? info.maxChunk : Math.max(1, Math.min(info.maxChunk, info.capacity - held));
      let last;
      for (let start = 0; start < ids.length; start += size) {
        last = lastLogits((await step(ids.slice(start, start + size)))[info.logits.name]);
      }
      held += ids.length;
      const random = rng(seed);
      const decode = info.tokenizer.decoder();
      let text = '';
      this.finishReason = 'length';
      for (let i = 0; i < maxTokens; i++) {
        if (info.capacity !== null && held >= info.capacity) break; // the memory is full
        const token = sample(last, random, { temperature, topK, topP });
        this.tokens.push(token);
        // every sampled token goes into the working memory, so the next turn continues from here
        last = lastLogits((await step([token]))[info.logits.name]);
        held += 1;
        if (info.tokenizer.eosTokenIds.has(token)) {
          this.finishReason = 'stop';
          break;
        }
        const piece = decode(token);
        text += piece;
        if (piece) yield piece;
        if (stop && text.endsWith(stop) && text.trim()) {
          this.finishReason = 'stop';
          break;
        }
      }
    },
    async text() {
      let out = '';
      for await (const piece of this) out += piece;
      return out;
    },
  };
  return generation;
}
