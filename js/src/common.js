// What both entry points export besides load(): the runtime classes, errors, snapshots and generation.

export { Model, Stream, StreamPool, createModel } from './runtime.js';
export { InputError, ContextLengthError } from './inputs.js';
export { SnapshotError, dumps as dumpSnapshot, loads as loadSnapshot, snapshotMeta } from './snapshot.js';
export { Spec, METADATA_KEY, specFromMetadata } from './spec.js';
export { readMetadataProps } from './protobuf.js';
export { generate, sample, Tokenizer, languageModelInfo } from './generation.js';
export { DTYPES, float16Bits } from './dtypes.js';
