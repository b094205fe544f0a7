// Host-side tensor plumbing for the runtime: fresh states, copies, and the concatenation / split along a
// batch axis that a pool step does (a pool member's state is its own batch-1 buffer; a step gathers the
// members of one engine call along each tensor's batch axis and scatters the results back).

import { DTYPES, filled } from './dtypes.js';

export const count = (dims) => dims.reduce((a, b) => a * b, 1);

/** A state at `batch` streams, every value the spec's init. */
export function initialState(spec, s, batch) {
  const dims = spec.stateDims(s, batch);
  return { data: filled(s.dtype, count(dims), s.init), dims };
}

/** Values along `axis` of `arrays` ({ data, dims } each, equal dims but on that axis) laid side by side. */
export function concat(arrays, axis) {
  const first = arrays[0];
  const outer = count(first.dims.slice(0, axis));
  const inners = arrays.map((a) => count(a.dims.slice(axis)));
  const dims = [...first.dims];
  dims[axis] = arrays.reduce((n, a) => n + a.dims[axis], 0);
  const data = new first.data.constructor(count(dims));
  let at = 0;
  for (let o = 0; o < outer; o++) {
    arrays.forEach((a, i) => {
      data.set(a.data.subarray(o * inners[i], (o + 1) * inners[i]), at);
      at += inners[i];
    });
  }
  return { data, dims };
}

/** `n` owned pieces of size 1 along `axis` of one { data, dims } (the inverse of concat of batch-1 pieces). */
export function split(array, axis, n) {
  const outer = count(array.dims.slice(0, axis));
  const inner = count(array.dims.slice(axis + 1));
  const dims = [...array.dims];
  dims[axis] = 1;
  const pieces = Array.from({ length: n }, () => ({ data: new array.data.constructor(outer * inner), dims }));
  for (let o = 0; o < outer; o++) {
    for (let i = 0; i < n; i++) {
      const from = (o * n + i) * inner;
      pieces[i].data.set(array.data.subarray(from, from + inner), o * inner);
    }
  }
  return pieces;
}

/** A constant's value (a JSON number or nested list) as { data, dims } of its dtype. */
export function constantArray(c) {
  const dims = [];
  for (let v = c.value; Array.isArray(v); v = v[0]) dims.push(v.length);
  const flat = dims.length ? c.value.flat(dims.length) : [c.value];
  const d = DTYPES[c.dtype];
  const data = new d.array(flat.length);
  flat.forEach((v, i) => {
    data[i] = d.array === BigInt64Array ? BigInt(v) : Number(v);
  });
  return { data, dims };
}
