// Signed reports (privacy mode private_gateway), as the Python SDK signs them.
//
// A gateway registered with AdminService.RegisterGateway signs each Record /
// RecordBatch call; the server verifies it before anything is settled and marks the
// event ATTESTED. The scheme is in proto/p402/v1/meter.proto ("Signed reports"):
//
//   x-p402-gateway-id, x-p402-timestamp (Unix seconds), x-p402-nonce,
//   x-p402-signature = "v1=" + hex HMAC-SHA256(secret, S)
//   S = "P402-HMAC-SHA256\n" + method + "\n" + timestamp + "\n" + nonce + "\n"
//       + hex SHA-256(the request's deterministic protobuf serialization)
//
// The deterministic serialization is what the server computes from the message it
// parsed: fields in field-number order (protobufjs' encoder sorts them), map entries
// sorted by key, proto3 scalars at their default left out (the server cannot tell them
// from unset), message fields kept when present (even empty). `canonicalRequest` makes
// those choices explicit before encoding, so the bytes match Python's
// `SerializeToString(deterministic=True)`; ../signing-vectors.json holds cases both
// SDKs are tested against.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import protobuf from "protobufjs";

import { PROTO_ROOT, THIRD_PARTY } from "./gateway.js";

export const SIGNED_METHODS = { Record: "RecordRequest", RecordBatch: "RecordBatchRequest" };

let cachedRoot = null;

/** The protobufjs Root of p402/v1/meter.proto (and what it imports). */
export function loadRoot(protoRoot = PROTO_ROOT) {
  if (cachedRoot && protoRoot === PROTO_ROOT) return cachedRoot;
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    for (const dir of [protoRoot, THIRD_PARTY]) {
      const full = path.resolve(dir, target);
      if (fs.existsSync(full)) return full;
    }
    return target;
  };
  root.loadSync("p402/v1/meter.proto", { keepCase: true });
  root.resolveAll();
  if (protoRoot === PROTO_ROOT) cachedRoot = root;
  return root;
}

function isDefault(field, value) {
  if (value === undefined || value === null) return true;
  if (field.resolvedType instanceof protobuf.Enum) {
    const n = typeof value === "number" ? value : field.resolvedType.values[value];
    return n === 0;
  }
  if (field.resolvedType instanceof protobuf.Type) return false; // present = kept
  if (typeof value === "boolean") return value === false;
  if (typeof value === "number") return value === 0;
  if (typeof value === "string") {
    return value === "" || (/int|fixed/.test(field.type) && /^-?0+$/.test(value));
  }
  if (value instanceof Uint8Array) return value.length === 0;
  return false;
}

/** `obj` with what the deterministic serialization leaves out removed and map keys
 * sorted (the module comment), ready for Type.fromObject. */
export function clean(type, obj) {
  const out = {};
  for (const field of type.fieldsArray) {
    const value = obj[field.name];
    if (value === undefined || value === null) continue;
    if (field.map) {
      const keys = Object.keys(value).sort();
      if (!keys.length) continue;
      const m = {};
      for (const k of keys) {
        m[k] = field.resolvedType instanceof protobuf.Type ? clean(field.resolvedType, value[k])
          : value[k];
      }
      out[field.name] = m;
    } else if (field.repeated) {
      if (!value.length) continue;
      out[field.name] = field.resolvedType instanceof protobuf.Type
        ? value.map((v) => clean(field.resolvedType, v)) : value;
    } else if (field.resolvedType instanceof protobuf.Type) {
      out[field.name] = clean(field.resolvedType, value);
    } else if (!isDefault(field, value)) {
      out[field.name] = value;
    }
  }
  return out;
}

/** The bytes a signature covers (a Buffer). */
export function canonicalRequest(method, request, root = loadRoot()) {
  const typeName = SIGNED_METHODS[method];
  if (!typeName) throw new TypeError(`only Record and RecordBatch calls are signed, not ${method}`);
  const type = root.lookupType(`p402.v1.${typeName}`);
  return Buffer.from(type.encode(type.fromObject(clean(type, request))).finish());
}

/** S of the module comment (a Buffer). */
export function stringToSign(method, timestamp, nonce, body) {
  const digest = crypto.createHash("sha256").update(body).digest("hex");
  return Buffer.from(["P402-HMAC-SHA256", method, String(timestamp), nonce, digest].join("\n"));
}

/** Signs Record / RecordBatch requests for one registered gateway. */
export class GatewaySigner {
  constructor(gatewayId, secretHex, { clock = () => Date.now() / 1000 } = {}) {
    if (!gatewayId) throw new TypeError("gatewayId is required (RegisterGateway's id)");
    if (!/^[0-9a-fA-F]+$/.test(secretHex ?? "") || secretHex.length % 2) {
      throw new TypeError("secret must be the hex secret RegisterGateway returned");
    }
    this.gatewayId = gatewayId;
    this.secret = Buffer.from(secretHex, "hex");
    this.clock = clock;
  }

  sign(method, timestamp, nonce, body) {
    const mac = crypto.createHmac("sha256", this.secret)
      .update(stringToSign(method, timestamp, nonce, body)).digest("hex");
    return `v1=${mac}`;
  }

  /** The four metadata entries that sign `request` for `method` ([key, value] pairs). */
  metadata(method, request, { timestamp, nonce } = {}) {
    const ts = String(timestamp ?? Math.floor(this.clock()));
    const n = nonce ?? crypto.randomBytes(18).toString("base64url");
    return [["x-p402-gateway-id", this.gatewayId], ["x-p402-timestamp", ts],
            ["x-p402-nonce", n],
            ["x-p402-signature", this.sign(method, ts, n, canonicalRequest(method, request))]];
  }
}
