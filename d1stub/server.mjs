// Starts the D1 HTTP API stand-in (worker.mjs) under miniflare on 127.0.0.1:<port>.
// Usage: node server.mjs <port> <account_id> <database_id> <api_token> [persist_dir]
// Prints "READY <url>" on stdout once it accepts requests; stops on SIGTERM/SIGINT or when its parent exits.
import { Miniflare } from "miniflare";
import { serve } from "./serve.mjs";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const [port, accountId, databaseId, apiToken, persist] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const mf = new Miniflare({
  modules: true,
  script: readFileSync(join(here, "worker.mjs"), "utf8"),
  d1Databases: ["DB"],
  d1Persist: persist || false,
  bindings: { ACCOUNT_ID: accountId, DATABASE_ID: databaseId, API_TOKEN: apiToken },
  host: "127.0.0.1",
  port: Number(port),
});
await serve(mf);
