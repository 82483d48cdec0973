// A compact msgpack encoder/decoder for the streamtok page (part of streamtok, MIT licence).
// Covers what the wire protocol uses (docs/PROTOCOL.md §2): nil, bool, ints (up to 64 bits),
// float32/64, str, bin, arrays and maps. Numbers that are integers encode as msgpack ints,
// others as float64; Uint8Array / ArrayBuffer / typed arrays encode as bin. Decoded bin is a
// Uint8Array; uint64/int64 beyond 2^53 decode as BigInt; ext types are refused.

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

class Writer {
  constructor(size = 256) {
    this.buf = new Uint8Array(size);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }
  reserve(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const grown = new Uint8Array(size);
    grown.set(this.buf.subarray(0, this.pos));
    this.buf = grown;
    this.view = new DataView(grown.buffer);
  }
  u8(v) { this.reserve(1); this.view.setUint8(this.pos, v); this.pos += 1; }
  u16(v) { this.reserve(2); this.view.setUint16(this.pos, v); this.pos += 2; }
  u32(v) { this.reserve(4); this.view.setUint32(this.pos, v); this.pos += 4; }
  bytes(b) { this.reserve(b.length); this.buf.set(b, this.pos); this.pos += b.length; }
  head(n, small, fixMax, c8, c16, c32) {
    // Length header: fix form, then 8 (if the type has one), 16 and 32 bits.
    if (n <= fixMax) this.u8(small | n);
    else if (c8 !== null && n < 0x100) { this.u8(c8); this.u8(n); }
    else if (n < 0x10000) { this.u8(c16); this.u16(n); }
    else { this.u8(c32); this.u32(n); }
  }
}

function encodeInt(w, v) {
  if (v >= 0) {
    if (v < 0x80) w.u8(v);
    else if (v < 0x100) { w.u8(0xcc); w.u8(v); }
    else if (v < 0x10000) { w.u8(0xcd); w.u16(v); }
    else if (v < 0x100000000) { w.u8(0xce); w.u32(v); }
    else { w.u8(0xcf); w.reserve(8); w.view.setBigUint64(w.pos, BigInt(v)); w.pos += 8; }
  } else if (v >= -32) w.u8(v & 0xff);
  else if (v >= -0x80) { w.u8(0xd0); w.reserve(1); w.view.setInt8(w.pos, v); w.pos += 1; }
  else if (v >= -0x8000) { w.u8(0xd1); w.reserve(2); w.view.setInt16(w.pos, v); w.pos += 2; }
  else if (v >= -0x80000000) { w.u8(0xd2); w.reserve(4); w.view.setInt32(w.pos, v); w.pos += 4; }
  else { w.u8(0xd3); w.reserve(8); w.view.setBigInt64(w.pos, BigInt(v)); w.pos += 8; }
}

function encodeValue(w, v) {
  if (v === null || v === undefined) w.u8(0xc0);
  else if (v === false) w.u8(0xc2);
  else if (v === true) w.u8(0xc3);
  else if (typeof v === "number") {
    if (Number.isSafeInteger(v)) encodeInt(w, v);
    else { w.u8(0xcb); w.reserve(8); w.view.setFloat64(w.pos, v); w.pos += 8; }
  } else if (typeof v === "bigint") {
    w.u8(v >= 0n ? 0xcf : 0xd3); w.reserve(8);
    if (v >= 0n) w.view.setBigUint64(w.pos, v); else w.view.setBigInt64(w.pos, v);
    w.pos += 8;
  } else if (typeof v === "string") {
    const b = textEncoder.encode(v);
    w.head(b.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
    w.bytes(b);
  } else if (v instanceof Uint8Array || v instanceof ArrayBuffer || ArrayBuffer.isView(v)) {
    const b = v instanceof ArrayBuffer ? new Uint8Array(v)
      : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
    w.head(b.length, 0, -1, 0xc4, 0xc5, 0xc6);
    w.bytes(b);
  } else if (Array.isArray(v)) {
    w.head(v.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const x of v) encodeValue(w, x);
  } else if (typeof v === "object") {
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    w.head(keys.length, 0x80, 15, null, 0xde, 0xdf);
    for (const k of keys) { encodeValue(w, k); encodeValue(w, v[k]); }
  } else {
    throw new TypeError(`msgpack: cannot encode ${typeof v}`);
  }
}

/** Encode a value to a Uint8Array. */
export function encode(value) {
  const w = new Writer();
  encodeValue(w, value);
  return w.buf.slice(0, w.pos);
}

class Reader {
  constructor(bytes) {
    this.buf = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  need(n) {
    if (this.pos + n > this.buf.length) throw new RangeError("msgpack: truncated data");
  }
  take(n) { this.need(n); const p = this.pos; this.pos += n; return p; }
  u8() { return this.view.getUint8(this.take(1)); }
  u16() { return this.view.getUint16(this.take(2)); }
  u32() { return this.view.getUint32(this.take(4)); }
  big(signed) {
    const p = this.take(8);
    const v = signed ? this.view.getBigInt64(p) : this.view.getBigUint64(p);
    return (v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER))
      ? Number(v) : v;
  }
  str(n) { const p = this.take(n); return textDecoder.decode(this.buf.subarray(p, p + n)); }
  bin(n) { const p = this.take(n); return this.buf.slice(p, p + n); }
  array(n) { const a = new Array(n); for (let i = 0; i < n; i++) a[i] = this.value(); return a; }
  map(n) {
    const m = {};
    for (let i = 0; i < n; i++) {
      const k = this.value();
      if (typeof k !== "string" && typeof k !== "number") throw new TypeError("msgpack: bad map key");
      m[k] = this.value();
    }
    return m;
  }
  value() {
    const c = this.u8();
    if (c < 0x80) return c;
    if (c < 0x90) return this.map(c & 0x0f);
    if (c < 0xa0) return this.array(c & 0x0f);
    if (c < 0xc0) return this.str(c & 0x1f);
    if (c >= 0xe0) return c - 0x100;
    switch (c) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.bin(this.u8());
      case 0xc5: return this.bin(this.u16());
      case 0xc6: return this.bin(this.u32());
      case 0xca: return this.view.getFloat32(this.take(4));
      case 0xcb: return this.view.getFloat64(this.take(8));
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: return this.big(false);
      case 0xd0: return this.view.getInt8(this.take(1));
      case 0xd1: return this.view.getInt16(this.take(2));
      case 0xd2: return this.view.getInt32(this.take(4));
      case 0xd3: return this.big(true);
      case 0xd9: return this.str(this.u8());
      case 0xda: return this.str(this.u16());
      case 0xdb: return this.str(this.u32());
      case 0xdc: return this.array(this.u16());
      case 0xdd: return this.array(this.u32());
      case 0xde: return this.map(this.u16());
      case 0xdf: return this.map(this.u32());
      default: throw new TypeError(`msgpack: unsupported type byte 0x${c.toString(16)}`);
    }
  }
}

/** Decode one value from a Uint8Array or ArrayBuffer; trailing bytes are an error. */
export function decode(data) {
  const r = new Reader(data instanceof Uint8Array ? data : new Uint8Array(data));
  const v = r.value();
  if (r.pos !== r.buf.length) throw new RangeError("msgpack: trailing bytes");
  return v;
}
