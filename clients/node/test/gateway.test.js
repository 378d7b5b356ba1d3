// The Node.js gateway against a live `p402 serve` (temp SQLite ledger, free port on
// 127.0.0.1): Authorize, Record, a budget denial, and the ledger read back by Query.
//
// Which p402 runs: $P402_BIN, else the repo's .venv/bin/p402 (what .ci/run
// installs), else `p402` on PATH, else `$P402_PYTHON -m p402_server.cli` (python3 by
// default) with the repo on PYTHONPATH.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { P402Denied, P402Gateway, moneyToNanos, nanosToMoney } from "../gateway.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

function p402Command() {
  if (process.env.P402_BIN) return { cmd: process.env.P402_BIN, pre: [], env: {} };
  const venv = path.join(REPO, ".venv", "bin", "p402");
  if (fs.existsSync(venv)) return { cmd: venv, pre: [], env: {} };
  for (const dir of (process.env.PATH || "").split(path.delimiter)) {
    const candidate = path.join(dir, "p402");
    if (dir && fs.existsSync(candidate)) return { cmd: candidate, pre: [], env: {} };
  }
  const pythonPath = [REPO, path.join(REPO, "server"), path.join(REPO, "clients", "python")];
  if (process.env.PYTHONPATH) pythonPath.push(process.env.PYTHONPATH);
  return {
    cmd: process.env.P402_PYTHON || "python3",
    pre: ["-m", "p402_server.cli"],
    env: { PYTHONPATH: pythonPath.join(path.delimiter) },
  };
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let dir;
let server;
let serverLog = "";
let gw;
let apiKey;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "p402-node-"));
  const db = `sqlite+aiosqlite:///${path.join(dir, "ledger.db")}`;
  const { cmd, pre, env } = p402Command();
  const childEnv = { ...process.env, ...env };
  const init = execFileSync(cmd, [...pre, "init", "--db", db, "--name", "node-test", "--json"],
                            { env: childEnv, encoding: "utf8", timeout: 60_000 });
  apiKey = JSON.parse(init).api_key;
  assert.match(apiKey, /^p402_/);
  const port = await freePort();
  server = spawn(cmd, [...pre, "serve", "--db", db, "--listen", `127.0.0.1:${port}`,
                       "--log-level", "WARNING"], { env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
  server.stdout.on("data", (d) => { serverLog += d; });
  server.stderr.on("data", (d) => { serverLog += d; });
  gw = new P402Gateway(`127.0.0.1:${port}`, apiKey, { timeoutMs: 2000 });
  // Wait (bounded) until the server answers an authenticated Ping.
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      await gw.ping();
      break;
    } catch (err) {
      if (server.exitCode !== null || Date.now() > deadline) {
        throw new Error(`p402 serve did not come up: ${err.message}\n${serverLog}`);
      }
      await sleep(200);
    }
  }
});

after(async () => {
  gw?.close();
  if (server && server.exitCode === null) {
    const exited = new Promise((r) => server.once("exit", r));
    server.kill("SIGTERM");
    await Promise.race([exited, sleep(10_000)]);
    if (server.exitCode === null) server.kill("SIGKILL");
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test("money converts exactly both ways", () => {
  assert.equal(moneyToNanos({ units: "12", nanos: 345 }), 12_000_000_345n);
  assert.equal(moneyToNanos(nanosToMoney(-1_500_000_001n)), -1_500_000_001n);
  assert.deepEqual(nanosToMoney(2_000_000_007n), { currency_code: "USD", units: "2", nanos: 7 });
});

test("authorize, record, and the ledger agrees", async () => {
  const auth = await gw.authorize({
    model: "gpt-4o-mini", owners: { customer: "acme", feature: "node" },
    labels: { lang: "js" }, inputBytes: 4000, maxOutputTokens: 200,
  });
  assert.equal(auth.decision, "DECISION_ALLOW");
  assert.ok(auth.reservation_id);
  assert.equal(auth.outputTokenCap, 200);
  assert.ok(auth.estimatedCostNanos > 0n);

  const rec = await gw.record({
    reservationId: auth.reservation_id, usage: { inputTokens: 900, outputTokens: 150 },
    revenueNanos: 3_000_000n,
  });
  assert.equal(rec.evidence, "EVIDENCE_REPORTED");
  assert.ok(rec.costNanos > 0n);
  assert.equal(moneyToNanos(rec.estimated_cost), auth.estimatedCostNanos);

  const { events } = await gw.query({ owners: { customer: "acme" } });
  const ev = events.find((e) => e.reservation_id === auth.reservation_id);
  assert.ok(ev, "the recorded event is in the ledger");
  assert.equal(ev.event_id, rec.event_id);
  assert.equal(ev.outcome, "OUTCOME_SUCCESS");
  assert.equal(ev.usage.input_tokens, "900");
  assert.equal(ev.usage.output_tokens, "150");
  assert.equal(ev.costNanos, rec.costNanos);
  assert.equal(moneyToNanos(ev.revenue), 3_000_000n);
  assert.deepEqual(ev.labels, { lang: "js" });
  assert.equal(ev.owners.feature, "node");
});

test("meteredCall records the provider's usage, and a DENY stops the call", async () => {
  const done = await gw.meteredCall(
    { model: "gpt-4o-mini", owners: { customer: "globex" }, inputBytes: 100, maxOutputTokens: 50 },
    async (cap) => ({ usage: { inputTokens: 25, outputTokens: Math.min(cap, 10) }, value: "ok" }),
  );
  assert.equal(done.value, "ok");
  assert.ok(done.record.costNanos > 0n);

  await gw.call("admin", "PutBudget", {
    budget: { budget_id: "tiny", scope: { customer: "tiny" }, period: "PERIOD_MONTH",
              limit: nanosToMoney(1n), enforcement: "ENFORCEMENT_HARD" },
  });
  let called = false;
  await assert.rejects(
    gw.meteredCall({ model: "gpt-4o-mini", owners: { customer: "tiny" }, maxOutputTokens: 100 },
                   async () => { called = true; return { usage: {} }; }),
    (err) => err instanceof P402Denied && err.reasons.includes("budget.exceeded"),
  );
  assert.equal(called, false);

  const failing = gw.meteredCall(
    { model: "gpt-4o-mini", owners: { customer: "globex" } },
    async () => { throw new Error("upstream 500"); },
  );
  await assert.rejects(failing, /upstream 500/);
  const { events } = await gw.query({ owners: { customer: "globex" },
                                      outcomes: ["OUTCOME_PROVIDER_ERROR"] });
  assert.equal(events.length, 1);
  assert.equal(events[0].costNanos, 0n);
});

test("a signed Record from Node is verified by the server (ATTESTED)", async () => {
  const { GatewaySigner } = await import("../signing.js");
  const reg = await gw.call("admin", "RegisterGateway", { gateway_id: "gw-node", name: "node" });
  const target = gw.meter.getChannel().getTarget().replace(/^dns:/, "");
  const signed = new P402Gateway(target, apiKey, {
    signer: new GatewaySigner("gw-node", reg.secret),
  });
  const res = await signed.record({
    model: "gpt-4o-mini", owners: { customer: "acme", feature: "signed" },
    usage: { inputTokens: 900, outputTokens: 90 },
  });
  assert.equal(res.evidence, "EVIDENCE_ATTESTED");
  // a wrong secret is refused before anything is settled
  const forged = new P402Gateway(target, apiKey, {
    signer: new GatewaySigner("gw-node", "00".repeat(32)),
  });
  await assert.rejects(forged.record({ model: "gpt-4o-mini", owners: { customer: "acme" },
                                       usage: { inputTokens: 1 } }),
                       (err) => err.code === 16); // UNAUTHENTICATED
});
