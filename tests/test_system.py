"""What a process reports about its own cost."""

import subprocess
import sys

from fedmoe_app.system import peak_rss_mb


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    ballast = bytearray(600_000_000)  # touched: 600 MB resident in this process
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert peak_rss_mb() > 600
    child = subprocess.run(
        [sys.executable, "-c", "from fedmoe_app.system import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True, text=True, check=True,
    )
    assert 1 < float(child.stdout) < 300  # a small interpreter, not the 600 MB it was forked from
    del ballast
