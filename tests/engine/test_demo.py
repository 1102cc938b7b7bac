"""The example writer of `d1sync demo` and `d1sync dev`: its ids never collide with a person's."""

import psycopg

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.demo import example_writes, live_writes


def test_the_writer_takes_ids_of_its_own_so_a_hand_inserted_row_never_collides(source_db):
    with PgmqClient(source_db) as pg, psycopg.connect(source_db, autocommit=True) as person:
        person.execute("INSERT INTO apps (id, name) VALUES (900000000, 'by hand')")
        example_writes(pg, rows=20)
        live_writes(pg, rows=10)
        # the person's own next id, chosen as people do, is still free, and the writer goes on (the live
        # writer deletes random apps, sometimes the person's own row: then the next id is the one after it)
        person.execute(
            "INSERT INTO apps (id, name) SELECT coalesce(max(id), 900000000) + 1, 'by hand' FROM apps WHERE id < 10^12"
        )
        live_writes(pg, rows=10)
        ids = [r[0] for r in pg.execute("SELECT id FROM apps WHERE name LIKE '%app%' ORDER BY id")]
    assert ids and all(i >= 10**12 for i in ids)
    # a taken id is skipped, not an error
    with PgmqClient(source_db) as pg:
        nxt = pg.execute("SELECT last_value + 1 FROM public.d1sync_example_app_ids")[0][0]
        pg.execute("INSERT INTO apps (id, name) VALUES (%s, 'squatter')", [nxt])
        live_writes(pg, rows=3)
