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
// Limits it enforces like D1 (the engine itself enforces 100 columns, 100 KB statements, expression depth):
// values over 2,000,000 bytes (SQLITE_TOOBIG) and functions with more than 32 arguments. The API's budget:
// with POST /__ratelimit {quota, window_seconds, lockout_seconds} every answer carries `Ratelimit` and
// `Ratelimit-Policy` headers, and past the quota every call is refused with 429 and `Retry-After` until the
// lockout ends. Time Travel: GET .../time_travel/bookmark snapshots the user tables under a bookmark, and
// POST .../time_travel/restore?bookmark=B puts that snapshot back.
//
// Test-only control routes (never in production): POST /__reset drops every user table;
// POST /__faults queues responses to return instead of (or after) the next API calls.

const faults = [];
const snapshots = new Map();
const limiter = { quota: null, window: 300, lockout: 300, started: 0, used: 0, lockedUntil: 0 };
const MAX_VALUE_BYTES = 2_000_000;
const MAX_FUNCTION_ARGS = 32;

// The API's budget: null when no quota is set, else a 429 response during a lockout (or the headers to add).
function budget(now) {
  if (limiter.quota === null) return { headers: {} };
  if (limiter.lockedUntil && now >= limiter.lockedUntil) {
    Object.assign(limiter, { lockedUntil: 0, started: now, used: 0 }); // a lockout ends with a fresh window
  }
  if (now - limiter.started >= limiter.window * 1000) {
    limiter.started = now;
    limiter.used = 0;
  }
  const policy = `"default";q=${limiter.quota};w=${limiter.window}`;
  if (now < limiter.lockedUntil) {
    const wait = Math.ceil((limiter.lockedUntil - now) / 1000);
    return { refused: wait, headers: { ratelimit: `"default";r=0;t=${wait}`, "ratelimit-policy": policy, "retry-after": String(wait) } };
  }
  limiter.used += 1;
  if (limiter.used > limiter.quota) {
    limiter.lockedUntil = now + limiter.lockout * 1000;
    return budget(now);
  }
  const reset = Math.max(0, Math.ceil((limiter.started + limiter.window * 1000 - now) / 1000));
  return { headers: { ratelimit: `"default";r=${limiter.quota - limiter.used};t=${reset}`, "ratelimit-policy": policy } };
}

// The most arguments any function call in `sql` takes (quotes respected), as SQLite's limit counts them.
export function maxFunctionArgs(sql) {
  const stack = [];
  let most = 0;
  let name = "";
  for (let i = 0; i < sql.length; i++) {
    const c = sql[i];
    if (c === "'" || c === '"' || c === "`") {
      const j = sql.indexOf(c, i + 1);
      i = j === -1 ? sql.length : j;
    } else if (c === "(") {
      // A call is a name before "(" that is neither a keyword nor a table or index being named.
      const before = sql.slice(Math.max(0, i - 160), i).match(/(?:([A-Za-z_][A-Za-z0-9_]*)\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*$/);
      const keyword = /^(IN|VALUES|AS|ON|USING|KEY|EXISTS|INTO|TABLE|INDEX|WHERE|AND|OR|NOT|CHECK|UNIQUE|OVER)$/i;
      const naming = /^(TABLE|INTO|INDEX|VIEW|EXISTS|ON|REFERENCES|JOIN|FROM|UPDATE|TRIGGER)$/i;
      const isCall = before && !keyword.test(before[2]) && !(before[1] && naming.test(before[1]));
      stack.push({ isCall, name: before ? before[2] : "", args: 1, empty: true });
    } else if (c === ")") {
      const f = stack.pop();
      if (f && f.isCall && !f.empty && f.args > most) [most, name] = [f.args, f.name];
    } else if (c === "," && stack.length) {
      stack[stack.length - 1].args += 1;
    } else if (stack.length && !/\s/.test(c)) {
      stack[stack.length - 1].empty = false;
    }
  }
  return { most, name };
}

function checkLimits(sql, params) {
  for (const p of params ?? []) {
    if (typeof p === "string" && new TextEncoder().encode(p).length > MAX_VALUE_BYTES) {
      throw new Error("string or blob too big: SQLITE_TOOBIG");
    }
  }
  const { most, name } = maxFunctionArgs(sql);
  if (most > MAX_FUNCTION_ARGS) throw new Error(`too many arguments on function ${name}: SQLITE_ERROR`);
}

async function userTables(db) {
  const { results } = await db
    .prepare("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%' AND sql IS NOT NULL ORDER BY type = 'index', rowid")
    .all();
  return results;
}

async function snapshot(db) {
  const out = [];
  for (const t of await userTables(db)) {
    const rows = t.type === "table" ? await db.prepare(`SELECT * FROM "${t.name.replaceAll('"', '""')}"`).raw() : [];
    out.push({ ...t, rows });
  }
  return out;
}

// D1 hands BLOBs out as arrays of bytes; they go back in as bytes.
const asBlob = (v) => (Array.isArray(v) ? new Uint8Array(v) : v);

async function restoreSnapshot(db, snap) {
  const drops = (await userTables(db)).filter((t) => t.type === "table");
  const stmts = drops.map((t) => db.prepare(`DROP TABLE IF EXISTS "${t.name.replaceAll('"', '""')}"`));
  for (const t of snap) {
    stmts.push(db.prepare(t.sql));
    for (const row of t.rows) {
      const marks = row.map(() => "?").join(", ");
      stmts.push(db.prepare(`INSERT INTO "${t.name.replaceAll('"', '""')}" VALUES (${marks})`).bind(...row.map(asBlob)));
    }
  }
  if (stmts.length) await db.batch(stmts);
}

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
      checkLimits(part, parts.length > 1 ? [] : q.params);
      stmts.push(db.prepare(part).bind(...(parts.length > 1 ? [] : (q.params ?? []))));
    }
  }
  if (raw) {
    // `/raw` keeps every column as D1 names it (duplicates, numeric names, in order), empty results too:
    // the statements' own raw form with column names, one statement at a time.
    const out = [];
    for (const stmt of stmts) {
      const [columns, ...rows] = await stmt.raw({ columnNames: true });
      out.push({ success: true, meta: { rows_read: rows.length, rows_written: 0 }, results: { columns, rows } });
    }
    return out;
  }
  // db.batch() runs the statements in one implicit transaction: all or nothing.
  const results = await db.batch(stmts);
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
      snapshots.clear();
      Object.assign(limiter, { quota: null, used: 0, lockedUntil: 0 });
      return envelope(200, { result: [] });
    }
    if (url.pathname === "/__ratelimit" && request.method === "POST") {
      const body = await request.json();
      Object.assign(limiter, { quota: body.quota ?? null, window: body.window_seconds ?? 300, lockout: body.lockout_seconds ?? 300 });
      Object.assign(limiter, { started: Date.now(), used: 0, lockedUntil: 0 });
      return envelope(200, { result: [] });
    }
    if (url.pathname === "/__faults" && request.method === "POST") {
      const body = await request.json();
      if (body.clear) faults.length = 0;
      faults.push(...(body.faults ?? []));
      return envelope(200, { result: [] });
    }
    const m = url.pathname.match(/\/accounts\/([^/]+)\/d1\/database\/([^/]+)\/(query|raw|time_travel\/bookmark|time_travel\/restore)$/);
    if (!m) return fail(404, 7000, "No route for that URI");
    const route = m[3];
    const method = route === "time_travel/bookmark" ? "GET" : "POST";
    if (request.method !== method) return fail(405, 10405, "Method not allowed");
    if (request.headers.get("authorization") !== `Bearer ${env.API_TOKEN}`) {
      return fail(401, 10000, "Authentication error");
    }
    if (m[1] !== env.ACCOUNT_ID || m[2] !== env.DATABASE_ID) {
      return fail(404, 7404, "The database could not be found");
    }
    const { refused, headers } = budget(Date.now());
    const withBudget = (response) => {
      for (const [k, v] of Object.entries(headers)) response.headers.set(k, v);
      return response;
    };
    if (refused) return withBudget(fail(429, 971, "Please wait and consider throttling your request speed"));
    return withBudget(await answer(request, env, url, route));
  },
};

async function answer(request, env, url, route) {
    if (route === "time_travel/bookmark") {
      const ts = Math.floor(Date.now() / 1000).toString(16).padStart(8, "0");
      const bookmark = `${ts}-${String(snapshots.size).padStart(8, "0")}-00000000-standin`;
      snapshots.set(bookmark, await snapshot(env.DB));
      return envelope(200, { result: { bookmark } });
    }
    if (route === "time_travel/restore") {
      const wanted = url.searchParams.get("bookmark");
      const snap = snapshots.get(wanted);
      if (!snap) return fail(400, 7400, `The bookmark ${wanted} is not a valid bookmark for this database`);
      const before = `${Math.floor(Date.now() / 1000).toString(16).padStart(8, "0")}-${String(snapshots.size).padStart(8, "0")}-00000000-standin`;
      snapshots.set(before, await snapshot(env.DB));
      await restoreSnapshot(env.DB, snap);
      return envelope(200, { result: { bookmark: wanted, previous_bookmark: before, message: "Database restored" } });
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
      result = await run(env.DB, queries, route === "raw");
    } catch (e) {
      const msg = String(e?.cause?.message ?? e?.message ?? e);
      return fail(400, 7500, msg);
    }
    if (fault && fault.delay_ms) await pause(); // D1 has committed; the answer comes late (a client timeout)
    if (fault && fault.status) return fakeResponse(fault);
    return envelope(200, { result });
}

function fakeResponse(fault) {
  if (fault.crash) throw new Error("injected worker crash");
  return new Response(JSON.stringify(fault.body ?? { result: null, success: false, errors: [{ code: 10000 + fault.status, message: `injected ${fault.status}` }], messages: [] }), {
    status: fault.status,
    headers: { "content-type": "application/json", ...(fault.headers ?? {}) },
  });
}
