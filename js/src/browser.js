// The browser entry: the runtime on onnxruntime-web (WebAssembly by default; pass
// sessionOptions.executionProviders for others). Bare imports need a bundler or an import map that
// resolves 'onnxruntime-web' (the demo page shows the import map); set ort.env.wasm.wasmPaths when the
// .wasm files are served from elsewhere than the bundle.

import * as ort from 'onnxruntime-web';
import { createModel } from './runtime.js';

export * from './common.js';
export { ort };
export const { Tensor } = ort;

/** Load an ONNX file carrying a wmdeploy spec: a URL (fetched), a Blob/File, or the file's bytes. */
export async function load(urlOrBytes, { sessionOptions = {} } = {}) {
  let bytes = urlOrBytes;
  let source = 'model';
  if (typeof urlOrBytes === 'string' || urlOrBytes instanceof URL) {
    source = String(urlOrBytes);
    const response = await fetch(urlOrBytes);
    if (!response.ok) throw new Error(`${source}: cannot fetch it (HTTP ${response.status})`);
    bytes = new Uint8Array(await response.arrayBuffer());
  } else if (typeof Blob !== 'undefined' && urlOrBytes instanceof Blob) {
    source = urlOrBytes.name || 'model';
    bytes = new Uint8Array(await urlOrBytes.arrayBuffer());
  } else if (urlOrBytes instanceof ArrayBuffer) {
    bytes = new Uint8Array(urlOrBytes);
  } else if (!(urlOrBytes instanceof Uint8Array)) {
    throw new Error(`load: got ${typeof urlOrBytes}, expected a URL, a Blob or the file's bytes (Uint8Array)`);
  }
  // no preallocated outputs: onnxruntime-web's WASM backend leaves a preallocated CPU output unwritten
  return createModel(ort, bytes, source, sessionOptions, { preallocate: false });
}
