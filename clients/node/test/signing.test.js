// The Node signer against the shared vectors (../signing-vectors.json, also checked by
// the Python SDK's tests), and a signed Record accepted by a live server as ATTESTED
// (in gateway.test.js's server, when P402_TARGET is set).
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import test from "node:test";
import { fileURLToPath } from "node:url";

import { GatewaySigner, canonicalRequest, stringToSign } from "../signing.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const VECTORS = JSON.parse(fs.readFileSync(path.resolve(HERE, "..", "..", "signing-vectors.json")));

for (const c of VECTORS.cases) {
  test(`signing vector: ${c.about}`, () => {
    const body = canonicalRequest(c.method, c.request);
    assert.equal(body.toString("hex"), c.canonical_hex);
    assert.equal(stringToSign(c.method, VECTORS.timestamp, VECTORS.nonce, body).toString(),
                 c.string_to_sign);
    const signer = new GatewaySigner(VECTORS.gateway_id, VECTORS.secret_hex);
    const md = Object.fromEntries(signer.metadata(c.method, c.request,
      { timestamp: VECTORS.timestamp, nonce: VECTORS.nonce }));
    assert.equal(md["x-p402-signature"], c.signature);
    assert.equal(md["x-p402-gateway-id"], VECTORS.gateway_id);
  });
}

test("a changed request changes the signature", () => {
  const c = VECTORS.cases[0];
  const signer = new GatewaySigner(VECTORS.gateway_id, VECTORS.secret_hex);
  const forged = { ...c.request, usage: { ...c.request.usage, output_tokens: "1" } };
  const md = Object.fromEntries(signer.metadata(c.method, forged,
    { timestamp: VECTORS.timestamp, nonce: VECTORS.nonce }));
  assert.notEqual(md["x-p402-signature"], c.signature);
  assert.throws(() => new GatewaySigner("gw", "not-hex"), TypeError);
  assert.throws(() => canonicalRequest("Authorize", {}), TypeError);
});
