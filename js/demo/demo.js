// The demo: one Stream of the recall model; each line is one generate() turn of one greedy token (as
// `wmdeploy chat --max-tokens 1`), so the answer to "?k" comes from the stream's state. Snapshot downloads
// the state in the Python snapshot format; Restore resumes one (from this page, Node or Python).

import { generate, load, ort } from 'wmdeploy';

ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.numThreads = 1; // a plain page is not cross-origin isolated: no SharedArrayBuffer for threads

const $ = (id) => document.getElementById(id);
const status = (text) => { $('status').textContent = text; };

function note(line, answer, cls = 'answer') {
  const li = document.createElement('li');
  li.append(`> ${line}`);
  const span = document.createElement('span');
  span.className = cls;
  span.textContent = answer;
  li.append(span);
  $('transcript').append(li);
}

let model;
let stream;

function describe() {
  status(`memory: ${stream.steps} steps, ${model.spec.stateBytesPerStream} bytes of state (${model.spec.states.map((s) => s.name).join(', ')})`);
}

async function ask(event) {
  event.preventDefault();
  const line = $('line').value;
  const text = line.replace(/\s+/g, '');
  if (!text) return;
  $('send').disabled = true;
  try {
    const answer = await generate(stream, text, { maxTokens: 1, temperature: 0 }).text();
    note(line, answer);
    $('line').value = '';
  } catch (err) {
    note(line, err.message, 'note');
  } finally {
    $('send').disabled = false;
    describe();
    $('line').focus();
  }
}

function download() {
  const bytes = stream.snapshot();
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  link.download = 'recall.wmsnap';
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  note('(snapshot)', `${bytes.length} bytes saved`, 'note');
}

async function restore() {
  const file = $('restore').files[0];
  if (!file) return;
  try {
    stream = model.stream({ snapshot: new Uint8Array(await file.arrayBuffer()) });
    note('(restore)', `${file.name}: ${stream.steps} steps of memory`, 'note');
  } catch (err) {
    note('(restore)', err.message, 'note'); // a snapshot of another model, or damaged bytes: the memory is unchanged
  }
  $('restore').value = '';
  describe();
}

try {
  model = await load(new URL('recall.onnx', location.href));
  stream = model.stream();
  $('ask').addEventListener('submit', ask);
  $('snapshot').addEventListener('click', download);
  $('restore').addEventListener('change', restore);
  $('reset').addEventListener('click', () => { stream.reset(); note('(reset)', 'memory cleared', 'note'); describe(); });
  for (const id of ['send', 'snapshot', 'reset', 'restore']) $(id).disabled = false;
  describe();
  document.body.dataset.ready = 'true';
} catch (err) {
  status(`cannot load the model: ${err.message}`);
  document.body.dataset.ready = 'error';
}
