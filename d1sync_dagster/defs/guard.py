"""Who may drop a D1 table. The open-source Dagster webserver has no login: anyone who can reach it can
launch any job with any config. So the destructive operations (nuke, and with it purging queued changes and
dead letters) are off in a Dagster deployment unless its operator turns them on for the code location with
`D1SYNC_ALLOW_DESTRUCTIVE=1`. The `d1sync` command line, run by someone who already holds the
credentials, keeps its `--yes` confirmation instead.

Every destructive run says who launched it and from where (Dagster's own run tags: `user` where Dagster+
sets it, the sensor, schedule or backfill that launched it, else a launch by hand from the UI or the API),
and the restore point taken before it, on the run and on the affected assets.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from d1sync_dagster.config import ALLOW_DESTRUCTIVE

#: Tags d1sync adds to a destructive run, read by the UI's run list and filters.
OPERATION_TAG, LAUNCHED_BY_TAG, SOURCE_TAG, RESTORE_POINT_TAG = (
    "d1sync/destructive",
    "d1sync/launched_by",
    "d1sync/source",
    "d1sync/restore_point",
)
#: Tag of a destructive run that refused, touching nothing (the deployment does not allow it).
REFUSED_TAG = "d1sync/refused"


def refusal(job: str) -> str:
    """Why a destructive job refuses, and how to enable it."""
    return (
        f"{job} is disabled in this Dagster deployment: it drops D1 tables, and the Dagster webserver has no "
        f"login, so anyone who can reach it could empty the replica. Nothing was touched. To enable it, set "
        f"{ALLOW_DESTRUCTIVE}=1 in the environment of the code location (the code server and the daemon) and "
        "reload it, ideally with the webserver behind an authenticating proxy; or, from a machine that holds the "
        "credentials, run `d1sync nuke --table <name> --yes` (or `d1sync nuke --all --yes`)."
    )


def describe(description: str, *, allowed: bool) -> str:
    """A destructive job's UI description, saying whether it is enabled here."""
    state = (
        f"Enabled in this deployment ({ALLOW_DESTRUCTIVE}=1)."
        if allowed
        else f"Disabled in this deployment: set {ALLOW_DESTRUCTIVE}=1 for the code location to enable it."
    )
    return f"{description} {state}"


@dataclass(frozen=True)
class Launcher:
    """Who launched a run and from where, as far as Dagster knows."""

    user: str
    source: str

    @classmethod
    def of(cls, run: dg.DagsterRun) -> Launcher:
        tags = run.tags
        if "dagster/sensor_name" in tags:
            source = f"sensor {tags['dagster/sensor_name']}"
        elif "dagster/schedule_name" in tags:
            source = f"schedule {tags['dagster/schedule_name']}"
        elif "dagster/backfill" in tags:
            source = f"backfill {tags['dagster/backfill']}"
        else:
            source = "ui"  # launched by hand: the UI, its GraphQL API or Python
        # Dagster+ tags a run with the user who launched it; open-source Dagster knows no users.
        return cls(user=tags.get("user") or "unknown (no login in open-source Dagster)", source=source)


def record(context: dg.OpExecutionContext, *, operation: str, launcher: Launcher, restore_point: str | None) -> None:
    """Tag the run with the destructive operation, its launcher and its restore point."""
    context.instance.add_run_tags(
        context.run_id,
        {
            OPERATION_TAG: operation,
            LAUNCHED_BY_TAG: launcher.user,
            SOURCE_TAG: launcher.source,
            RESTORE_POINT_TAG: restore_point or "none",
        },
    )
