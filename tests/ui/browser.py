"""Headless Chromium (Debian's `chromium`, driven by playwright-core from d1stub/node_modules) for UI tests."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts"
SCRIPT = ROOT / "d1stub" / "screenshot.mjs"
NODE = ROOT / "d1stub" / "node_modules" / ".bin" / "node"


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def screenshot(url: str, name: str, *, wait_for: list[str]) -> tuple[Path, dict]:
    """Open `url`, wait until every text in `wait_for` is visible, save `test-artifacts/<name>`."""
    browser = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / name
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [str(NODE), str(SCRIPT), url, str(out), *wait_for],
        env=os.environ | {"CHROMIUM": browser},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"screenshot of {url} failed:\n{proc.stderr[-3000:]}"
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
