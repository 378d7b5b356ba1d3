// A small Node.js gateway calling P402 over gRPC, straight from the .proto files.
//
// It proves the wire contract works from a second language: no generated code, the
// services are loaded at run time from ../../proto with @grpc/proto-loader and called
// with @grpc/grpc-js. What a gateway does around each provider call:
//
//   const p402 = new P402Gateway("127.0.0.1:4020", process.env.P402_API_KEY);
//   const result = await p402.meteredCall(
//     { model: "gpt-4o-mini", owners: { customer: "acme" }, inputBytes: 1200,
//       maxOutputTokens: 256 },
//     async (outputTokenCap) => {
//       const reply = await callProvider({ max_tokens: outputTokenCap });
//       return { usage: { inputTokens: reply.usage.prompt_tokens,
//                         outputTokens: reply.usage.completion_tokens },
//                value: reply };
//     });
//
// Money: P402 sends google.type.Money (units + nanos); this module turns it into a
// BigInt of nano-USD, exactly (int64 fields are loaded as strings, never as floats).
// Authorize's DENY is data (`decision === "DECISION_DENY"`); meteredCall turns it into
// a P402Denied error and never calls the provider.

import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const PROTO_ROOT = path.resolve(HERE, "..", "..", "proto");
// google/type/money.proto and google/rpc/status.proto, vendored (Apache-2.0) so no Python
// or googleapis checkout is needed.
export const THIRD_PARTY = path.resolve(HERE, "third_party");
const NANOS_PER_USD = 1_000_000_000n;

/** The p402.v1 package object (MeterService, AdminService, messages). */
export function loadP402(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(
    ["p402/v1/meter.proto", "p402/v1/admin.proto"],
    {
      includeDirs: [protoRoot, THIRD_PARTY],
      keepCase: true, // field names exactly as in the .proto (one concept, one name)
      longs: String, // int64 as decimal strings: exact, turned into BigInt below
      enums: String, // enum values by name: "DECISION_ALLOW"
      defaults: true,
      oneofs: true,
    },
  );
  return grpc.loadPackageDefinition(definition).p402.v1;
}

/** google.type.Money -> BigInt nano-USD (exact). */
export function moneyToNanos(money) {
  if (!money) return 0n;
  return BigInt(money.units ?? 0) * NANOS_PER_USD + BigInt(money.nanos ?? 0);
}

/** BigInt (or integer Number) nano-USD -> google.type.Money. */
export function nanosToMoney(nanos) {
  const n = BigInt(nanos);
  const sign = n < 0n ? -1n : 1n;
  const abs = n < 0n ? -n : n;
  return {
    currency_code: "USD",
    units: String(sign * (abs / NANOS_PER_USD)),
    nanos: Number(sign * (abs % NANOS_PER_USD)),
  };
}

/** Raised by meteredCall when Authorize answers DENY. */
export class P402Denied extends Error {
  constructor(authorization) {
    super(`P402 denied ${authorization.model}: ${authorization.reasons.join(", ")}`);
    this.name = "P402Denied";
    this.authorization = authorization;
    this.reasons = authorization.reasons;
    this.retryAfterMs = Number(authorization.retry_after_ms || 0);
  }
}

function unary(client, method, request, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, metadata, { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

export class P402Gateway {
  /**
   * @param {string} target HOST:PORT of `p402 serve`
   * @param {string} apiKey a P402 key with the meter scope (read for query, admin for admin calls)
   */
  // `signer`: a signing.GatewaySigner; Record calls are then signed (privacy mode
  // private_gateway; the server marks verified reports ATTESTED).
  constructor(target, apiKey, { timeoutMs = 5000, credentials, protoRoot, signer } = {}) {
    if (!target) throw new TypeError("target is required (HOST:PORT)");
    if (!apiKey) throw new TypeError("apiKey is required");
    const p402 = loadP402(protoRoot);
    const creds = credentials ?? grpc.credentials.createInsecure();
    this.meter = new p402.MeterService(target, creds);
    this.admin = new p402.AdminService(target, creds, { channelOverride: this.meter.getChannel() });
    this.metadata = new grpc.Metadata();
    this.metadata.set("authorization", `Bearer ${apiKey}`);
    this.timeoutMs = timeoutMs;
    this.signer = signer ?? null;
  }

  call(service, method, request) {
    let metadata = this.metadata;
    if (this.signer && service === "meter" && (method === "Record" || method === "RecordBatch")) {
      metadata = this.metadata.clone(); // fresh per call: a nonce is single-use
      for (const [k, v] of this.signer.metadata(method, request)) metadata.set(k, v);
    }
    return unary(this[service], method, request, metadata, this.timeoutMs);
  }

  async ping() {
    return this.call("meter", "Ping", {});
  }

  /** Authorize: the decision, with money as BigInt nano-USD beside the wire fields. */
  async authorize({ model, provider = "", owners = {}, labels = {}, inputBytes = -1,
                    maxOutputTokens = 0, reservationId = "", attempt = 0, retryOf = "" }) {
    const res = await this.call("meter", "Authorize", {
      model, provider, owners, labels,
      input_bytes: String(inputBytes),
      max_output_tokens: String(maxOutputTokens),
      reservation_id: reservationId,
      attempt, retry_of: retryOf,
    });
    return {
      ...res,
      allowed: res.decision === "DECISION_ALLOW" || res.decision === "DECISION_WARN",
      estimatedCostNanos: moneyToNanos(res.estimated_cost),
      outputTokenCap: Number(res.output_token_cap),
    };
  }

  /** Record: settles the reservation with the actual usage; durable when it returns. */
  async record({ reservationId = "", eventId = "", model = "", owners, usage = {},
                 outcome = "OUTCOME_SUCCESS", revenueNanos, attempt = 0, retryOf = "" }) {
    const request = {
      event_id: eventId, reservation_id: reservationId, model,
      usage: {
        input_tokens: String(usage.inputTokens ?? 0),
        cached_input_tokens: String(usage.cachedInputTokens ?? 0),
        cache_write_tokens: String(usage.cacheWriteTokens ?? 0),
        output_tokens: String(usage.outputTokens ?? 0),
        reasoning_tokens: String(usage.reasoningTokens ?? 0),
      },
      outcome, attempt, retry_of: retryOf,
    };
    if (owners) request.owners = owners;
    if (revenueNanos !== undefined) request.revenue = nanosToMoney(revenueNanos);
    const res = await this.call("meter", "Record", request);
    return { ...res, costNanos: moneyToNanos(res.cost) };
  }

  async release(reservationId) {
    return this.call("meter", "Release", { reservation_id: reservationId });
  }

  /** One page of ledger events (newest first), with costNanos on each. */
  async query(filter = {}, { pageSize = 100, pageToken = "" } = {}) {
    const res = await this.call("meter", "Query", {
      filter, page_size: pageSize, page_token: pageToken,
    });
    return {
      events: res.events.map((e) => ({ ...e, costNanos: moneyToNanos(e.cost) })),
      nextPageToken: res.next_page_token,
    };
  }

  /**
   * Authorize, run `fn(outputTokenCap)` (the provider call, returning
   * `{ usage, value }`), then Record its usage; an error thrown by `fn` is recorded
   * as OUTCOME_PROVIDER_ERROR and rethrown. DENY throws P402Denied before `fn` runs.
   */
  async meteredCall(request, fn) {
    const auth = await this.authorize(request);
    if (!auth.allowed) throw new P402Denied(auth);
    let result;
    try {
      result = await fn(auth.outputTokenCap);
    } catch (err) {
      await this.record({ reservationId: auth.reservation_id, outcome: "OUTCOME_PROVIDER_ERROR" });
      throw err;
    }
    const recorded = await this.record({ reservationId: auth.reservation_id, usage: result.usage });
    return { authorization: auth, record: recorded, value: result.value };
  }

  close() {
    this.meter.close();
  }
}
