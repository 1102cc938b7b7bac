"""The real `dagster-daemon` on a production-like instance (Postgres storage, run monitoring: the
dagster.yaml of docs/deploy.md), streaming while a writer writes, with the process that follows the queue
killed (kill -9) and, separately, the daemon's whole process group killed and the daemon started again. The
standby takes over, the sensor gives up the dead runs, and nothing is lost. (benchmarks/soak.py runs the
same with every fault and reports the recovery times: docs/benchmarks.md.)"""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_the_daemon_on_a_postgres_instance_recovers_from_kill_9_and_a_process_group_kill():
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/soak.py",
            "--daemon",
            "--instance", "postgres",
            "--mode", "stream",
            "--rate", "100",
            "--seconds", "50",
            "--interval", "5",
            "--faults", "kill9,group",
            "--fault-every", "20",
            "--json",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["drift"] == 0 and figures["dead_letters"] == 0, out.stdout
    assert figures["faults"] == 2, out.stdout  # both were injected while rows were written
    # Changes flowed again after each (seconds in the docs; a generous bound here, the machine is shared).
    assert figures["recovery_max_s"] < 30, out.stdout
    assert "d1sync_stream failure" in out.stdout  # the killed runs were given up, not left STARTED
