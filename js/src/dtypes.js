// The dtypes a spec may name (wmdeploy/_spec_checks.py DTYPES), with the typed array that holds each in
// JS, onnxruntime's tensor type name, and numpy's dtype string as snapshots write it (arr.dtype.str).

export const DTYPES = {
  float32: { array: Float32Array, ort: 'float32', numpy: '<f4', size: 4, kind: 'f' },
  // float16 travels as raw bits in a Uint16Array (onnxruntime's JS convention; Float16Array is not everywhere)
  float16: { array: Uint16Array, ort: 'float16', numpy: '<f2', size: 2, kind: 'f' },
  float64: { array: Float64Array, ort: 'float64', numpy: '<f8', size: 8, kind: 'f' },
  int64: { array: BigInt64Array, ort: 'int64', numpy: '<i8', size: 8, kind: 'i' },
  int32: { array: Int32Array, ort: 'int32', numpy: '<i4', size: 4, kind: 'i' },
  int8: { array: Int8Array, ort: 'int8', numpy: '|i1', size: 1, kind: 'i' },
  uint8: { array: Uint8Array, ort: 'uint8', numpy: '|u1', size: 1, kind: 'u' },
  // bool is one byte per value, 0 or 1, in a Uint8Array, as onnxruntime's JS API and numpy hold it
  bool: { array: Uint8Array, ort: 'bool', numpy: '|b1', size: 1, kind: 'b' },
};

/** The dtype name of a typed array, as numpy would call it (a Uint8Array is uint8; bool needs an ort Tensor). */
export function dtypeOfArray(data) {
  if (data instanceof Float32Array) return 'float32';
  if (data instanceof Float64Array) return 'float64';
  if (data instanceof BigInt64Array) return 'int64';
  if (data instanceof Int32Array) return 'int32';
  if (data instanceof Int8Array) return 'int8';
  if (data instanceof Uint8Array) return 'uint8';
  if (data instanceof Uint16Array) return 'uint16';
  if (data instanceof Int16Array) return 'int16';
  if (data instanceof Uint32Array) return 'uint32';
  if (data instanceof BigUint64Array) return 'uint64';
  if (typeof Float16Array !== 'undefined' && data instanceof Float16Array) return 'float16';
  return null;
}

/** Little-endian machine? Snapshots are little-endian; a big-endian host would need byte swaps. */
export const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A fresh typed array of `n` values of `dtype`, every one `init` (a spec state's initial value). */
export function filled(dtype, n, init = 0) {
  const d = DTYPES[dtype];
  const arr = new d.array(n);
  if (init !== 0 && init !== false) {
    if (d.kind === 'i') arr.fill(BigInt64Array === d.array ? BigInt(init) : Number(init));
    else if (dtype === 'float16') arr.fill(float16Bits(Number(init)));
    else arr.fill(Number(init));
  }
  return arr;
}

/** IEEE half-precision bits of a number (round to nearest even), for a float16 state's initial value. */
export function float16Bits(value) {
  const f = new Float32Array([value]);
  const x = new Uint32Array(f.buffer)[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1))) half++;
  return sign | half;
}
