"""Example writes for the example schema: what the first-run command and the demo use to show rows flowing.

New apps take their ids from a sequence of their own, `public.d1sync_example_app_ids`, starting far above
the ids a person types (10^12), so an app inserted by hand (`id = 900000000`, and its `max(id) + 1`
successor) never collides with the writer's; an id that is taken anyway is skipped, never an error."""

from __future__ import annotations

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import SchemaError

IDS = "CREATE SEQUENCE IF NOT EXISTS public.d1sync_example_app_ids START 1000000000000"

WRITES = """
INSERT INTO public.apps (id, owner_id, name, is_public, settings, rating, icon, created_at)
SELECT i, gen_random_uuid(), 'app ' || i, i %% 2 = 0,
       jsonb_build_object('theme', CASE WHEN g %% 3 = 0 THEN 'dark' ELSE 'light' END, 'n', i),
       round((random() * 5)::numeric, 2)::float8, decode(md5(i::text), 'hex'), now() - g * interval '1 hour'
FROM (SELECT g, nextval('public.d1sync_example_app_ids') AS i FROM generate_series(1, %(rows)s) g) n
ON CONFLICT (id) DO NOTHING;

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
    pg.execute(IDS)
    for statement in WRITES.strip().split(";\n"):
        if statement.strip():
            pg.execute(statement, {"rows": rows})


LIVE_WRITES = """
INSERT INTO public.apps (id, owner_id, name, is_public, settings, rating, icon, created_at)
SELECT i, gen_random_uuid(), 'live app ' || i, random() < 0.5,
       jsonb_build_object('theme', 'light', 'n', i), round((random() * 5)::numeric, 1)::float8, NULL, now()
FROM (SELECT nextval('public.d1sync_example_app_ids') AS i FROM generate_series(1, %(rows)s)) n
ON CONFLICT (id) DO NOTHING;

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
    pg.execute(IDS)
    with pg.transaction():
        for statement in LIVE_WRITES.strip().split(";\n"):
            pg.execute(statement, {"rows": rows})
