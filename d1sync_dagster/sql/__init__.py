"""Text generation from the schema: the Postgres capture migration and the D1 DDL. No I/O."""
