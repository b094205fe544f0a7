// JSON text exactly as Python's json.dumps writes it (ensure_ascii on, chosen separators, optional
// sort_keys): the layout hash is a SHA-256 of such text, and a snapshot header is compared by that hash,
// so one differing byte would make Python refuse a JS snapshot and the other way round.
// Numbers: only integers occur in what is hashed or framed (shapes, offsets, step counts); a non-integer
// is refused rather than written the way JS prints it (1e-7 where Python writes 1e-07).

function escapeString(text) {
  let out = '"';
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += '\\\\';
    else if (c === 0x0a) out += '\\n';
    else if (c === 0x0d) out += '\\r';
    else if (c === 0x09) out += '\\t';
    else if (c === 0x08) out += '\\b';
    else if (c === 0x0c) out += '\\f';
    // Python escapes everything outside ' '..'~' as \uXXXX (UTF-16 code units: astral characters become
    // surrogate pairs, which is also how a JS string holds them)
    else if (c < 0x20 || c > 0x7e) out += '\\u' + c.toString(16).padStart(4, '0');
    else out += text[i];
  }
  return out + '"';
}

/**
 * `json.dumps(value, separators=(item, key), sort_keys=sortKeys)` of Python, for strings, integers,
 * booleans, null, arrays and plain objects.
 */
export function pyDumps(value, { item = ', ', key = ': ', sortKeys = false } = {}) {
  const walk = (v) => {
    if (v === null) return 'null';
    if (v === true) return 'true';
    if (v === false) return 'false';
    if (typeof v === 'string') return escapeString(v);
    if (typeof v === 'number' || typeof v === 'bigint') {
      if (typeof v === 'number' && !Number.isSafeInteger(v)) {
        throw new TypeError(`pyDumps: ${v} is not an integer; only integers are written the way Python writes them`);
      }
      return String(v);
    }
    if (Array.isArray(v)) return '[' + v.map(walk).join(item) + ']';
    if (typeof v === 'object') {
      const keys = Object.keys(v);
      if (sortKeys) keys.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)); // code-unit order, as Python's for BMP keys
      return '{' + keys.map((k) => escapeString(k) + key + walk(v[k])).join(item) + '}';
    }
    throw new TypeError(`pyDumps: cannot write a ${typeof v}`);
  };
  return walk(value);
}
