"""Workflows shared by the command line and Dagster: they take clients and a schema, never read config."""
