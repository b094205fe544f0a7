// The Node entry: the runtime on onnxruntime-node (native ONNX Runtime, CPU).

import { readFile } from 'node:fs/promises';
import * as ort from 'onnxruntime-node';
import { createModel } from './runtime.js';

export * from './common.js';
export { ort };
export const { Tensor } = ort;

/**
 * Load an ONNX file carrying a wmdeploy spec: a path (or file: URL), or the file's bytes.
 * `options.sessionOptions` go to onnxruntime's InferenceSession.create (threads, providers, ...).
 */
export async function load(pathOrBytes, { sessionOptions = {} } = {}) {
  let bytes = pathOrBytes;
  let source = 'model';
  if (typeof pathOrBytes === 'string' || pathOrBytes instanceof URL) {
    source = String(pathOrBytes instanceof URL ? pathOrBytes.pathname : pathOrBytes);
    try {
      bytes = new Uint8Array(await readFile(pathOrBytes));
    } catch (err) {
      throw new Error(err.code === 'ENOENT' ? `${source}: no such model file` : `${source}: cannot read it (${err.message})`);
    }
  } else if (pathOrBytes instanceof ArrayBuffer) {
    bytes = new Uint8Array(pathOrBytes);
  } else if (!(pathOrBytes instanceof Uint8Array)) {
    throw new Error(`load: got ${typeof pathOrBytes}, expected a path or the file's bytes (Uint8Array)`);
  }
  // onnxruntime-node writes preallocated outputs: each stream's states ping-pong between two buffers
  return createModel(ort, bytes, source, sessionOptions, { preallocate: true });
}
