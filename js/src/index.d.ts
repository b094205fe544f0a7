// Types of the wmdeploy package (both entries: "node" on onnxruntime-node, "browser" on onnxruntime-web).
import type { InferenceSession, Tensor as OrtTensor } from 'onnxruntime-common';

export type Tensor = OrtTensor;
export const Tensor: typeof OrtTensor;
/** The onnxruntime module in use (onnxruntime-node or onnxruntime-web): set ort.env here. */
export const ort: any;

export type Dim = number | string;
export type DType = 'float32' | 'float16' | 'float64' | 'int64' | 'int32' | 'int8' | 'uint8' | 'bool';
export type TypedData = Float32Array | Float64Array | Uint16Array | BigInt64Array | Int32Array | Int8Array | Uint8Array;
/** A step input: an onnxruntime Tensor, typed or plain values with dims, or a nested plain array (converted when lossless in kind). */
export type InputValue = Tensor | { data: TypedData | number[] | boolean[]; dims: number[] } | unknown[];
/** A state as the runtime hands it out: a copy of its values and dims. */
export interface HostArray { data: TypedData; dims: number[] }

export interface TensorSpec { name: string; shape: Dim[]; dtype: DType; batchAxis: number; index_bound?: number; doc?: string }
export interface StateSpec extends TensorSpec { output: string; init: number | boolean; inplace: boolean }

/** The file's streaming spec (wmdeploy.spec in its metadata_props). */
export class Spec {
  constructor(json: object, source?: string);
  readonly json: any;
  readonly inputs: TensorSpec[];
  readonly outputs: TensorSpec[];
  readonly states: StateSpec[];
  readonly constants: { name: string; value: unknown; dtype: DType }[];
  readonly chunkInvariant: boolean;
  readonly meta: Record<string, any>;
  /** SHA-256 of the state layout, as Python's StreamingSpec.layout_hash(): what a snapshot must match. */
  readonly layoutHash: string;
  readonly maxBatch: number | null;
  readonly stateBytesPerStream: number;
  input(name: string): TensorSpec;
  output(name: string): TensorSpec;
  stateDims(state: StateSpec, batch: number): number[];
}

export interface LoadOptions {
  /** Passed to onnxruntime's InferenceSession.create (threads, executionProviders, ...). */
  sessionOptions?: InferenceSession.SessionOptions;
}

/** Node: a path, file: URL or the file's bytes. Browser: a URL (fetched), a Blob/File or the bytes. */
export function load(source: string | URL | Uint8Array | ArrayBuffer | Blob, options?: LoadOptions): Promise<Model>;

export class Model {
  readonly spec: Spec;
  readonly session: InferenceSession;
  readonly source: string;
  /** A fresh working memory, or one resumed from a snapshot (then its batch is the snapshot's). */
  stream(options?: { batch?: number; snapshot?: Uint8Array | ArrayBuffer | null }): Stream;
  pool(options?: { capacity?: number | null }): StreamPool;
  release(): Promise<void>;
}

export class Stream {
  readonly model: Model;
  readonly spec: Spec;
  readonly batch: number;
  /** Successful steps since the start (or the snapshot's count). */
  readonly steps: number;
  /** Tokens held (a language model with meta.position_state; 0 otherwise). */
  readonly position: number;
  /** One chunk; resolves to the data outputs. The state moves on only if the step succeeds. */
  step(inputs: Record<string, InputValue>): Promise<Record<string, Tensor>>;
  reset(): void;
  /** A copy of the working memory. */
  readonly state: Record<string, HostArray>;
  /** The working memory in the Python snapshot format (layout hash, tensors, SHA-256). */
  snapshot(): Uint8Array;
}

export class StreamPool {
  readonly capacity: number | null;
  readonly size: number;
  readonly sids: number[];
  has(sid: number): boolean;
  /** Add a stream (fresh, or from a one-stream snapshot); returns its id. */
  join(snapshot?: Uint8Array | ArrayBuffer | null): number;
  leave(sid: number): void;
  reset(sid: number): void;
  state(sid: number): Record<string, HostArray>;
  snapshot(sid: number): Uint8Array;
  /** Step some streams (inputs with a batch axis of 1), one engine call per input shape; all-or-nothing. */
  step(requests: Map<number, Record<string, InputValue>> | Record<number, Record<string, InputValue>>): Promise<Map<number, Record<string, Tensor>>>;
}

export interface GenerateOptions { maxTokens?: number; temperature?: number; topK?: number; topP?: number; seed?: number | null; stop?: string | null }
export interface Generation extends AsyncIterable<string> {
  readonly stream: Stream;
  readonly tokens: number[];
  /** "stop" (an eos id or the stop string) or "length"; null until it ends. */
  readonly finishReason: 'stop' | 'length' | null;
  text(): Promise<string>;
}
/** Continue a prompt (text, or token ids) on a stream, or on a fresh stream of a model. */
export function generate(modelOrStream: Model | Stream, prompt: string | number[], options?: GenerateOptions): Generation;
export function sample(logits: ArrayLike<number>, random: () => number, options?: { temperature?: number; topK?: number; topP?: number }): number;
export class Tokenizer {
  constructor(vocab: Record<string, any>, vocabSize: number);
  readonly kind: string;
  encode(text: string): number[];
  decode(ids: number[]): string;
  decoder(): (token: number) => string;
}
export function languageModelInfo(spec: Spec, source?: string): Record<string, any>;

export class InputError extends Error {}
export class ContextLengthError extends InputError {}
export class SnapshotError extends Error {}
export function dumpSnapshot(spec: Spec, states: Record<string, HostArray>, meta?: Record<string, unknown>): Uint8Array;
export function loadSnapshot(spec: Spec, blob: Uint8Array | ArrayBuffer): { states: Record<string, HostArray>; batch: number; steps: number };
export function snapshotMeta(blob: Uint8Array | ArrayBuffer): Record<string, unknown>;
export function readMetadataProps(bytes: Uint8Array, source?: string): Map<string, string>;
export function specFromMetadata(props: Map<string, string>, source: string): Spec;
export const METADATA_KEY: 'wmdeploy.spec';
export const DTYPES: Record<DType, { array: any; ort: string; numpy: string; size: number; kind: string }>;
export function float16Bits(value: number): number;
export function createModel(ort: any, bytes: Uint8Array, source: string, sessionOptions?: object, engine?: { preallocate?: boolean }): Promise<Model>;
