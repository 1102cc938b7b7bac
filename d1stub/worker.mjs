// A local stand-in for Cloudflare's D1 HTTP API, run by miniflare on the real D1 engine (workerd).
//
// Routes and shapes follow the public API:
//   POST {base}/accounts/{account}/d1/database/{db}/query  body {sql, params?} or {batch: [{sql, params?}]}
//   POST {base}/accounts/{account}/d1/database/{db}/raw    same bodies, rows as arrays
// Responses: {success, errors: [{code, message}], messages: [], result: [{results, success, meta}]}.
// It is at least as strict as production: params must be strings or null (the published spec types them
// as strings), BEGIN/COMMIT are refused, SQL errors are HTTP 400 with code 7500 and SQLite's text,
// a bad token is 401 (code 10000), an unknown database 404 (code 7404).
//
// Test-only control routes (never in production): POST /__reset drops every user table;
// POST /__faults queues responses to return instead of (or after) the next API calls.

const faults = [];

function envelope(status, { result = null, errors = [], success = errors.length === 0 } = {}, headers = {}) {
  return new Response(JSON.stringify({ result, success, errors, messages: [] }), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

function fail(status, code, message) {
  return envelope(status, { errors: [{ code, message }] });
}

// Split a SQL string into statements on top-level semicolons (quotes and comments respected),
// so a multi-statement `sql` returns one result per statement, as the real API does.
export function splitStatements(sql) {
  const out = [];
  let cur = "";
  let i = 0;
  while (i < sql.length) {
    const c = sql[i];
    if (c === "'" || c === '"' || c === "`" || c === "[") {
      const close = c === "[" ? "]" : c;
      let j = i + 1;
      while (j < sql.length) {
        if (sql[j] === close) {
          if (close !== "]" && sql[j + 1] === close) { j += 2; continue; }
          break;
        }
        j++;
      }
      cur += sql.slice(i, j + 1);
      i = j + 1;
    } else if (c === "-" && sql[i + 1] === "-") {
      const j = sql.indexOf("\n", i);
      i = j === -1 ? sql.length : j + 1;
      cur += " ";
    } else if (c === "/" && sql[i + 1] === "*") {
      const j = sql.indexOf("*/", i + 2);
      i = j === -1 ? sql.length : j + 2;
      cur += " ";
    } else if (c === ";") {
      if (cur.trim()) out.push(cur.trim());
      cur = "";
      i++;
    } else {
      cur += c;
      i++;
    }
  }
  if (cur.trim()) out.push(cur.trim());
  return out;
}

const TRANSACTION_WORDS = /^\s*(BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE)\b/i;

function checkQuery(q) {
  if (typeof q !== "object" || q === null || typeof q.sql !== "string") return "each query needs a string `sql`";
  if (q.params !== undefined) {
    if (!Array.isArray(q.params)) return "`params` must be an array";
    for (const p of q.params) {
      if (p !== null && typeof p !== "string") return "`params` items must be strings";
    }
  }
  return null;
}

async function run(db, queries, raw) {
  const stmts = [];
  for (const q of queries) {
    const parts = splitStatements(q.sql);
    if (parts.length === 0) throw new Error("No SQL statements detected.");
    if (parts.length > 1 && q.params && q.params.length) {
      throw new Error("A query with several statements cannot take params");
    }
    for (const part of parts) {
      if (TRANSACTION_WORDS.test(part)) {
        throw new Error("To execute a transaction, please use the state.storage.transaction() APIs instead of the SQL BEGIN TRANSACTION or SAVEPOINT statements.: SQLITE_AUTH");
      }
      stmts.push(db.prepare(part).bind(...(parts.length > 1 ? [] : (q.params ?? []))));
    }
  }
  // db.batch() runs the statements in one implicit transaction: all or nothing.
  const results = await db.batch(stmts);
  if (raw) {
    // Object rows lose duplicate column names; the stand-in accepts that for the compact form.
    return results.map((r) => ({
      success: true,
      meta: r.meta,
      results: {
        columns: r.results.length ? Object.keys(r.results[0]) : [],
        rows: r.results.map((row) => Object.values(row)),
      },
    }));
  }
  return results.map((r) => ({ success: true, meta: r.meta, results: r.results }));
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    if (url.pathname === "/__reset" && request.method === "POST") {
      const { results } = await env.DB.prepare(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table','view') AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%'"
      ).all();
      for (const r of results) {
        await env.DB.prepare(`DROP ${r.type === "view" ? "VIEW" : "TABLE"} IF EXISTS "${r.name.replaceAll('"', '""')}"`).run();
      }
      faults.length = 0;
      return envelope(200, { result: [] });
    }
    if (url.pathname === "/__faults" && request.method === "POST") {
      const body = await request.json();
      if (body.clear) faults.length = 0;
      faults.push(...(body.faults ?? []));
      return envelope(200, { result: [] });
    }
    const tt = url.pathname.match(/\/accounts\/([^/]+)\/d1\/database\/([^/]+)\/time_travel\/bookmark$/);
    if (tt && request.method === "GET") {
      if (request.headers.get("authorization") !== `Bearer ${env.API_TOKEN}`) return fail(401, 10000, "Authentication error");
      if (tt[1] !== env.ACCOUNT_ID || tt[2] !== env.DATABASE_ID) return fail(404, 7404, "The database could not be found");
      // Same shape as the real API; the stand-in cannot restore, so the bookmark only names the moment.
      const ts = Math.floor(Date.now() / 1000).toString(16).padStart(8, "0");
      return envelope(200, { result: { bookmark: `${ts}-00000000-00000000-standin` } });
    }
    const m = url.pathname.match(/\/accounts\/([^/]+)\/d1\/database\/([^/]+)\/(query|raw)$/);
    if (!m || request.method !== "POST") return fail(404, 7000, "No route for that URI");
    if (request.headers.get("authorization") !== `Bearer ${env.API_TOKEN}`) {
      return fail(401, 10000, "Authentication error");
    }
    if (m[1] !== env.ACCOUNT_ID || m[2] !== env.DATABASE_ID) {
      return fail(404, 7404, "The database could not be found");
    }
    const fault = faults.shift();
    const pause = () => new Promise((r) => setTimeout(r, fault.delay_ms));
    if (fault && fault.delay_ms && !fault.after) await pause();
    if (fault && !fault.after) return fakeResponse(fault);

    let body;
    try {
      body = await request.json();
    } catch {
      return fail(400, 7400, "The request is malformed: body is not JSON");
    }
    const queries = Array.isArray(body?.batch) ? body.batch : [body];
    for (const q of queries) {
      const problem = checkQuery(q);
      if (problem) return fail(400, 7400, `The request is malformed: ${problem}`);
    }
    let result;
    try {
      result = await run(env.DB, queries, m[3] === "raw");
    } catch (e) {
      const msg = String(e?.cause?.message ?? e?.message ?? e);
      return fail(400, 7500, msg);
    }
    if (fault && fault.delay_ms) await pause(); // D1 has committed; the answer comes late (a client timeout)
    if (fault && fault.status) return fakeResponse(fault);
    return envelope(200, { result });
  },
};

function fakeResponse(fault) {
  if (fault.crash) throw new Error("injected worker crash");
  return new Response(JSON.stringify(fault.body ?? { result: null, success: false, errors: [{ code: 10000 + fault.status, message: `injected ${fault.status}` }], messages: [] }), {
    status: fault.status,
    headers: { "content-type": "application/json", ...(fault.headers ?? {}) },
  });
}
