// The few bytes of an ONNX file that onnxruntime's JS API cannot show: ModelProto.metadata_props, where
// the wmdeploy spec lives (InferenceSession has no custom-metadata call in JS). A protobuf reader of
// exactly what is needed: walk the top-level fields, skip every one but field 14, and read each
// StringStringEntryProto (key = 1, value = 2). The graph (field 7, the weights) is skipped by its
// length, never parsed.

const METADATA_PROPS = 14;

class Reader {
  constructor(bytes, source) {
    this.bytes = bytes;
    this.at = 0;
    this.source = source;
  }

  fail(what) {
    return new Error(`${this.source}: not a readable ONNX model (${what} at byte ${this.at})`);
  }

  varint() {
    // lengths and tags only: a Number holds them exactly up to 2^53 (files are far smaller)
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.at >= this.bytes.length) throw this.fail('truncated varint');
      const b = this.bytes[this.at++];
      value += (b & 0x7f) * scale;
      if (b < 0x80) return value;
      scale *= 128;
    }
    throw this.fail('varint longer than 10 bytes');
  }

  skip(wire) {
    if (wire === 0) this.varint();
    else if (wire === 1) this.advance(8);
    else if (wire === 2) this.advance(this.varint());
    else if (wire === 5) this.advance(4);
    else throw this.fail(`unsupported wire type ${wire}`);
  }

  advance(n) {
    if (this.at + n > this.bytes.length) throw this.fail(`a field of ${n} bytes runs past the end`);
    this.at += n;
  }

  bytesField() {
    const n = this.varint();
    const start = this.at;
    this.advance(n);
    return this.bytes.subarray(start, start + n);
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function readEntry(bytes, source) {
  const r = new Reader(bytes, source);
  let key = '';
  let value = '';
  while (r.at < bytes.length) {
    const tag = r.varint();
    const field = Math.floor(tag / 8);
    const wire = tag & 7;
    if ((field === 1 || field === 2) && wire === 2) {
      let text;
      try {
        text = utf8.decode(r.bytesField());
      } catch {
        throw new Error(`${source}: a metadata_props entry is not valid UTF-8`);
      }
      if (field === 1) key = text;
      else value = text;
    } else {
      r.skip(wire);
    }
  }
  return [key, value];
}

/** Every metadata_props entry of the ONNX file in `bytes` (a Uint8Array), as a Map key -> value. */
export function readMetadataProps(bytes, source = 'model') {
  const r = new Reader(bytes, source);
  const props = new Map();
  while (r.at < bytes.length) {
    const tag = r.varint();
    const field = Math.floor(tag / 8);
    const wire = tag & 7;
    if (field === 0) throw r.fail('field number 0');
    if (field === METADATA_PROPS && wire === 2) {
      const [key, value] = readEntry(r.bytesField(), source);
      props.set(key, value);
    } else {
      r.skip(wire);
    }
  }
  return props;
}
