// Which D1 database holds a row of a sharded table: the routing function d1sync's engine uses
// (d1sync_dagster/core/shards.py), for readers in a Worker. No dependencies, no async.
//
// A rule is the table's entry of "shardBy" in targets.json (also printed by `d1sync shards --json`):
//   { column: "tenant_id", map?: { "acme": "eu1" }, hash?: ["s0", "s1", ...], default?: "eu1" }
// The value is the shard column's value as D1 holds it: an integer (pass integers beyond 2^53 as a bigint
// or a decimal string), a boolean, a text (UUIDs lower-case), or null.

export interface ShardRule {
  column: string;
  map?: Record<string, string>;
  hash?: string[];
  default?: string;
}

const MASK = (1n << 64n) - 1n;

/** The value's key text: integers in decimal, booleans as 1/0, text as it is, null as "". */
export function keyText(value: number | bigint | string | boolean | null | undefined): string {
  if (value === null || value === undefined) return "";
  if (typeof value === "boolean") return value ? "1" : "0";
  if (typeof value === "number") {
    if (!Number.isInteger(value)) throw new TypeError("a shard column holds integers or text");
    return BigInt(value).toString();
  }
  if (typeof value === "bigint") return value.toString();
  return value;
}

/** 64-bit FNV-1a over the UTF-8 bytes, then splitmix64's finalizer. */
export function keyHash(text: string): bigint {
  let h = 0xcbf29ce484222325n;
  for (const b of new TextEncoder().encode(text)) {
    h = ((h ^ BigInt(b)) * 0x100000001b3n) & MASK;
  }
  h = ((h ^ (h >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
  h = ((h ^ (h >> 27n)) * 0x94d049bb133111ebn) & MASK;
  return h ^ (h >> 31n);
}

/** Jump consistent hash (Lamping and Veach): the bucket in [0, buckets) of a 64-bit key. */
export function jump(key: bigint, buckets: number): number {
  let b = -1;
  let j = 0;
  while (j < buckets) {
    b = j;
    key = (key * 2862933555777941757n + 1n) & MASK;
    j = Math.trunc((b + 1) * (2147483648 / (Number(key >> 33n) + 1)));
  }
  return b;
}

/** The shard (a name of targets.json's "shards") holding the row whose shard column is `value`. */
export function shardFor(rule: ShardRule, value: number | bigint | string | boolean | null | undefined): string {
  const text = keyText(value);
  const mapped = rule.map?.[text];
  if (mapped !== undefined && Object.prototype.hasOwnProperty.call(rule.map, text)) return mapped;
  if (rule.hash && rule.hash.length > 0) return rule.hash[jump(keyHash(text), rule.hash.length)];
  if (rule.default === undefined) throw new Error(`no shard for ${JSON.stringify(text)}: the rule has no hash or default`);
  return rule.default;
}

// A Worker that reads a tenant's devices from its shard: one D1 binding per shard, named as in targets.json.
//
//   import { shardFor, type ShardRule } from "./shard";
//   const devices: ShardRule = { column: "tenant_id", hash: ["s0", "s1", "s2", "s3"] };
//   export default {
//     async fetch(request: Request, env: Record<string, D1Database>): Promise<Response> {
//       const tenant = new URL(request.url).searchParams.get("tenant") ?? "";
//       const db = env[`DB_${shardFor(devices, tenant).toUpperCase()}`];
//       const { results } = await db.prepare("SELECT * FROM devices WHERE tenant_id = ?").bind(tenant).all();
//       return Response.json(results);
//     },
//   };
