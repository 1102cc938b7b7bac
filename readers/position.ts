// Read-your-writes for a Worker reading the D1 copy d1sync keeps: has a Postgres transaction arrived, and
// how fresh is D1? No dependencies. The Python twin is the package's position module (`d1sync applied`).
//
// Each D1 commit d1sync makes records, in the same D1 transaction, how far D1 is complete: a Postgres
// snapshot "xmin:xmax:xip,..." in `_d1sync_meta` (key `position`, and `position_at`, when). Every source
// transaction that snapshot sees as committed is in D1, whole (d1sync publishes each transaction in one D1
// transaction); the ones it lists in xip, or at or past xmax, are not yet. An older transaction still open
// in Postgres stays in xip and hides nothing newer.
//
// The write path returns its transaction id from Postgres, in the same transaction as its writes:
//   select pg_current_xact_id()::text   (or d1sync's RPC, see the README: "Has my write arrived?")
// and the reader waits for it before it reads:
//
//   const session = env.DB.withSession(request.headers.get("x-d1-bookmark") ?? "first-unconstrained");
//   if (!(await waitForApplied(session, txid, { timeoutMs: 5000 }))) return new Response("not yet", { status: 503 });
//   const rows = await session.prepare("SELECT ... ").all();   // the same session: at least as new
//   return Response.json(rows, { headers: { "x-d1-bookmark": session.getBookmark() ?? "" } });
//
// With D1's Sessions API (read replicas), read the position and the data through the same session and pass
// the bookmark on: a session's reads never go back in time, so data read after `applied` returned true
// holds the transaction. A sharded target records one position per shard database: ask the shard that
// holds the rows (readers/shard.ts says which).

/** What this module needs of a D1 binding or of a session from `withSession()`. */
export interface D1Readable {
  prepare(query: string): { first<T = Record<string, unknown>>(): Promise<T | null> };
}

export interface Position {
  xmin: bigint;
  xmax: bigint;
  xip: bigint[];
}

/** Parse a Postgres snapshot `xmin:xmax:xip1,xip2` (pg_current_snapshot()'s text). */
export function parsePosition(text: string): Position {
  const parts = text.trim().split(":");
  if (parts.length !== 3 || !/^\d+$/.test(parts[0]) || !/^\d+$/.test(parts[1])) {
    throw new Error(`not a Postgres snapshot (xmin:xmax:xip): ${text.slice(0, 80)}`);
  }
  const xip = parts[2] === "" ? [] : parts[2].split(",").map((x) => {
    if (!/^\d+$/.test(x)) throw new Error(`not a Postgres snapshot (xmin:xmax:xip): ${text.slice(0, 80)}`);
    return BigInt(x);
  });
  return { xmin: BigInt(parts[0]), xmax: BigInt(parts[1]), xip };
}

/** Whether transaction `txid` had ended when the snapshot was taken (Postgres's pg_visible_in_snapshot). */
export function visible(p: Position, txid: bigint | number | string): boolean {
  const x = BigInt(txid);
  if (x < p.xmin) return true;
  if (x >= p.xmax) return false;
  return !p.xip.includes(x);
}

interface MetaRow {
  position: string | null;
  position_at: string | null;
}

async function read(db: D1Readable): Promise<MetaRow> {
  const row = await db
    .prepare(
      "SELECT (SELECT value FROM _d1sync_meta WHERE key = 'position') AS position, " +
        "(SELECT value FROM _d1sync_meta WHERE key = 'position_at') AS position_at",
    )
    .first<MetaRow>();
  return row ?? { position: null, position_at: null };
}

/** Whether the effects of Postgres transaction `txid` are in D1 (false before d1sync's first position). */
export async function applied(db: D1Readable, txid: bigint | number | string): Promise<boolean> {
  const { position } = await read(db);
  return position !== null && visible(parsePosition(position), txid);
}

/** Poll `applied` until it is true or `timeoutMs` passes (default 10 s); whether the transaction arrived. */
export async function waitForApplied(
  db: D1Readable,
  txid: bigint | number | string,
  { timeoutMs = 10_000, pollMs = 100 }: { timeoutMs?: number; pollMs?: number } = {},
): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await applied(db, txid)) return true;
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await new Promise((resolve) => setTimeout(resolve, Math.min(pollMs, left)));
  }
}

/** The last position D1 recorded, when, and its age in milliseconds (nulls before the first). */
export async function freshness(
  db: D1Readable,
): Promise<{ position: string | null; appliedAt: string | null; ageMs: number | null }> {
  const { position, position_at } = await read(db);
  const ageMs = position_at === null ? null : Date.now() - Date.parse(position_at);
  return { position, appliedAt: position_at, ageMs };
}
