"""The shipped systemd unit passes `systemd-analyze verify` (pointed at this checkout)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_service_unit_verifies(tmp_path):
    with open(os.path.join(ROOT, "systemd", "blockd.service")) as f:
        text = f.read()
    assert "--metrics 127.0.0.1:9810" in text and "KillSignal=SIGTERM" in text
    unit = tmp_path / "blockd.service"
    unit.write_text(text.replace("/opt/blockd", ROOT))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
