"""Dagster wiring only: resources, assets, checks, sensors, jobs, schedules."""
