"""`benchmarks/serve_load.py` runs end to end at a tiny size (a few seconds, a few clients) and its checks hold.

As in test_benchmark_scripts.py: the numbers mean nothing here; what is checked is that the script still
drives the real server with every kind of client it claims to, and that the server's answers to them are
the ones the full-size run reports (zero 5xx, 413 for 10 MB prompts, 408 for stalled sockets, hung-up
streams aborted so the engine ends idle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--duration", "4",
                           "--concurrency", "6", "--disconnects", "12", "--disconnect-workers", "3",
                           "--big-prompts", "2", "--slowloris", "4", "--body-timeout", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and all(res["checks"].values()) and res["server_5xx"] == 0
    assert res["phases"]["abuse"]["status"].get("200", 0) > 0 and res["phases"]["abuse"]["success_rate"] == 1.0
    assert res["big_prompts"]["status"] == {"413": 2}
    assert res["disconnects"]["done"] == 12 and res["after"]["server_stats"]["aborted_generations"] >= 1
    assert any(k.startswith("HTTP/1.1 408") for k in res["slowloris"]["outcomes"])
    assert res["rss_mib"]["before"] > 0 and "completions_per_s" in res["phases"]["baseline"]
    assert "during abuse" in proc.stdout and "PASS" in proc.stdout
