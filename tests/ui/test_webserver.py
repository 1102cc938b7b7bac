"""The Dagster UI's view of the code location: start dagster-webserver on workspace.yaml and ask its
GraphQL API for the assets, checks, sensor, schedule and jobs."""

import pytest

from tests.helpers import dagster_webserver, graphql_repositories

QUERY = """
{
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        name
        jobs { name }
        sensors { name description }
        schedules { name cronSchedule }
        assetNodes {
          assetKey { path }
          groupName
          description
          assetChecksOrError { ... on AssetChecks { checks { name } } }
        }
      }
    }
  }
}
"""


@pytest.fixture
def webserver(tmp_path):
    with dagster_webserver(tmp_path) as url:
        yield url


def test_ui_shows_assets_checks_sensor_schedule_and_jobs(webserver):
    (repo,) = graphql_repositories(webserver, QUERY)
    assets = {tuple(a["assetKey"]["path"]): a for a in repo["assetNodes"]}
    assert set(assets) == {
        ("d1", "apps"),
        ("d1", "app_versions"),
        ("postgres", "public", "apps"),
        ("postgres", "public", "app_versions"),
    }
    apps = assets[("d1", "apps")]
    assert apps["groupName"] == "d1" and "public.apps" in apps["description"]
    checks = {c["name"] for c in apps["assetChecksOrError"]["checks"]}
    assert checks == {
        "row_count_matches_source",
        "replication_lag_under_threshold",
        "no_dead_letters",
        "source_matches_schema",
        "rows_match_source",
    }
    jobs = {j["name"] for j in repo["jobs"]}
    assert {"d1sync_apply", "d1sync_setup", "d1sync_backfill", "d1sync_nuke", "d1sync_reconcile"} <= jobs
    (sensor,) = repo["sensors"]
    assert sensor["name"] == "pgmq_depth_sensor" and "PGMQ" in sensor["description"]
    (schedule,) = repo["schedules"]
    assert schedule["name"] == "d1sync_reconcile_schedule" and schedule["cronSchedule"] == "0 3 * * *"
