"""Example writes for the example schema: what the first-run command and the demo use to show rows flowing."""

from __future__ import annotations

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import SchemaError

WRITES = """
INSERT INTO public.apps (id, owner_id, name, is_public, settings, rating, icon, created_at)
SELECT b + g, gen_random_uuid(), 'app ' || (b + g), (b + g) %% 2 = 0,
       jsonb_build_object('theme', CASE WHEN g %% 3 = 0 THEN 'dark' ELSE 'light' END, 'n', b + g),
       round((random() * 5)::numeric, 2)::float8, decode(md5((b + g)::text), 'hex'), now() - g * interval '1 hour'
FROM (SELECT coalesce(max(id), 0) AS b FROM public.apps) base, generate_series(1, %(rows)s) g;

INSERT INTO public.app_versions (app_id, version, manifest, downloads, released_at)
SELECT id, '1.0.' || (id %% 3), jsonb_build_object('min_os', 14, 'features', jsonb_build_array('a', 'b')),
       (random() * 1e6)::bigint, now()
FROM public.apps ORDER BY id DESC LIMIT %(rows)s
ON CONFLICT DO NOTHING;

UPDATE public.apps SET rating = 5.0, name = name || ' (featured)' WHERE id %% 7 = 0 AND rating IS DISTINCT FROM 5.0;
DELETE FROM public.apps WHERE id %% 11 = 0;
"""


def example_writes(pg: PgmqClient, *, rows: int) -> None:
    """Insert `rows` apps and versions, update and delete a few (needs the example tables)."""
    missing = pg.execute("SELECT to_regclass('public.apps') IS NULL OR to_regclass('public.app_versions') IS NULL")
    if missing[0][0]:
        raise SchemaError(
            "the example tables public.apps and public.app_versions do not exist (d1sync setup "
            "--create-example-tables creates them)"
        )
    for statement in WRITES.strip().split(";\n"):
        if statement.strip():
            pg.execute(statement, {"rows": rows})


LIVE_WRITES = """
INSERT INTO public.apps (id, owner_id, name, is_public, settings, rating, icon, created_at)
SELECT b + g, gen_random_uuid(), 'live app ' || (b + g), random() < 0.5,
       jsonb_build_object('theme', 'light', 'n', b + g), round((random() * 5)::numeric, 1)::float8, NULL, now()
FROM (SELECT coalesce(max(id), 0) AS b FROM public.apps) base, generate_series(1, %(rows)s) g;

INSERT INTO public.app_versions (app_id, version, manifest, downloads, released_at)
SELECT id, '1.0.0', jsonb_build_object('min_os', 14), 0, now()
FROM public.apps ORDER BY id DESC LIMIT %(rows)s
ON CONFLICT DO NOTHING;

UPDATE public.app_versions SET downloads = downloads + 1 + (random() * 100)::bigint
WHERE (app_id, version) IN (SELECT app_id, version FROM public.app_versions ORDER BY random() LIMIT %(rows)s);

UPDATE public.apps SET rating = round((random() * 5)::numeric, 1)::float8
WHERE id IN (SELECT id FROM public.apps ORDER BY random() LIMIT greatest(%(rows)s / 4, 1));

DELETE FROM public.apps WHERE id IN (SELECT id FROM public.apps ORDER BY random() LIMIT greatest(%(rows)s / 10, 1))
"""


def live_writes(pg: PgmqClient, *, rows: int) -> None:
    """One tick of the dev generator: `rows` new apps and versions, `rows` download counts bumped, a quarter
    as many ratings changed and a tenth as many apps deleted, in one transaction."""
    with pg.transaction():
        for statement in LIVE_WRITES.strip().split(";\n"):
            pg.execute(statement, {"rows": rows})
