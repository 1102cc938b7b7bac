-- Postgres tables that match the example schema.json (used by the tests, the demo and the benchmarks).
-- `secret_note` is not in schema.json: it never reaches the queue or D1.
CREATE TABLE IF NOT EXISTS public.apps (
  id          bigint PRIMARY KEY,
  owner_id    uuid,
  name        text NOT NULL,
  is_public   boolean NOT NULL DEFAULT false,
  settings    jsonb,
  rating      double precision,
  icon        bytea,
  created_at  timestamptz NOT NULL DEFAULT now(),
  secret_note text
);

CREATE TABLE IF NOT EXISTS public.app_versions (
  app_id      bigint NOT NULL,
  version     text NOT NULL,
  manifest    jsonb,
  downloads   bigint NOT NULL DEFAULT 0,
  released_at timestamptz,
  PRIMARY KEY (app_id, version)
);
