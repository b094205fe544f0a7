// A small static server for the demo page: the page, the package's src/, onnxruntime-web's dist/ (the
// .mjs and .wasm files) and one model file as /recall.onnx. No dependencies, GET only, no directory listings.
//
//   node demo/serve.js [--model ../out/recall.onnx] [--port 8080]

import { createReadStream, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, '..');

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css',
  '.wasm': 'application/wasm', '.onnx': 'application/octet-stream', '.png': 'image/png', '.json': 'application/json',
};

/** Start serving; resolves to { url, close() }. `model` is the .onnx file served as /recall.onnx. */
export function serve({ model = resolve(pkg, '..', 'out', 'recall.onnx'), port = 0, host = '127.0.0.1' } = {}) {
  const roots = [['/src/', join(pkg, 'src')], ['/ort/', join(pkg, 'node_modules', 'onnxruntime-web', 'dist')], ['/', here]];
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    let file = null;
    if (path === '/recall.onnx') file = model;
    else {
      const [prefix, root] = roots.find(([p]) => path.startsWith(p));
      const candidate = normalize(join(root, path.slice(prefix.length) || 'index.html'));
      if (candidate.startsWith(root + sep) || candidate === root) file = candidate; // never outside its root
    }
    let size = -1;
    try {
      const st = file && statSync(file);
      size = st && st.isFile() ? st.size : -1;
    } catch {
      size = -1;
    }
    if (req.method !== 'GET' || size < 0) {
      res.writeHead(req.method !== 'GET' ? 405 : 404, { 'content-type': 'text/plain' });
      res.end(req.method !== 'GET' ? 'GET only\n' : `not found: ${path}\n`);
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream', 'content-length': size, 'cache-control': 'no-store' });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolveUrl, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      const url = `http://${host}:${server.address().port}/`;
      resolveUrl({ url, close: () => new Promise((done) => server.close(done)) });
    });
  });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const arg = (name) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : undefined;
  };
  const model = resolve(arg('--model') ?? resolve(pkg, '..', 'out', 'recall.onnx'));
  try {
    statSync(model);
  } catch {
    console.error(`${model}: no such model file; export it first (README "Quick start"):\n  wmdeploy export wmdeploy.models.gru_attention:GRUAttentionLM --checkpoint models/checkpoints/gru_attention_recall.pt -o out/recall.onnx`);
    process.exit(2);
  }
  const { url } = await serve({ model, port: Number(arg('--port') ?? 8080) });
  console.log(`demo: ${url} (model ${model})`);
}
