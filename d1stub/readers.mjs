// Runs readers/position.ts in workerd (miniflare) against a real D1 binding, for the tests: the module's
// types are stripped by Node, and a small Worker exposes it through the D1 Sessions API.
// Usage: node readers.mjs <port>. Prints "READY <url>"; stops on SIGTERM/SIGINT or when its parent exits.
// Routes: POST /sql {sql} runs SQL on the binding (test setup); GET /applied?txid=, /wait?txid=&timeoutMs=,
// /freshness call the module through `env.DB.withSession(...)` and answer with its result and the bookmark.
import { Miniflare } from "miniflare";
import { serve } from "./serve.mjs";
import { readFileSync } from "node:fs";
import { stripTypeScriptTypes } from "node:module";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const [port] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const position = stripTypeScriptTypes(readFileSync(join(here, "..", "readers", "position.ts"), "utf8"));
const worker = `
import { applied, waitForApplied, freshness } from "./position.js";
export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    if (url.pathname === "/sql") {
      const { sql } = await request.json();
      await env.DB.exec(sql);
      return Response.json({ ok: true });
    }
    const session = env.DB.withSession(request.headers.get("x-d1-bookmark") ?? "first-unconstrained");
    const txid = url.searchParams.get("txid");
    let result;
    if (url.pathname === "/applied") result = await applied(session, txid);
    else if (url.pathname === "/wait") {
      result = await waitForApplied(session, txid, { timeoutMs: Number(url.searchParams.get("timeoutMs") ?? 1000), pollMs: 20 });
    } else if (url.pathname === "/freshness") result = await freshness(session);
    else return new Response("not found", { status: 404 });
    return Response.json({ result, bookmark: session.getBookmark() ?? null });
  },
};`;
const mf = new Miniflare({
  modules: [
    { type: "ESModule", path: join(here, "reader-worker.mjs"), contents: worker },
    { type: "ESModule", path: join(here, "position.js"), contents: position },
  ],
  d1Databases: ["DB"],
  compatibilityDate: "2025-04-01",
  host: "127.0.0.1",
  port: Number(port),
});
await serve(mf);
