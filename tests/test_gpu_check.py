"""The prepared GPU check, dry-run on the CPU with tiny shapes, so that it cannot rot before a GPU
is lent: every check runs and passes, and the run needs neither DuckDB nor Ray nor Optuna, which
the GPU machine does not have (here they are shadowed by modules that refuse to import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_gpu_check_dry_runs_on_the_cpu_without_duckdb_ray_or_optuna(tmp_path: Path) -> None:
    blocked = tmp_path / "not-installed"
    for name in ("duckdb", "ray", "optuna"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = json.loads((out / "gpu_check.json").read_text())
    failed = {name: r.get("error") for name, r in results["checks"].items() if not r["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    checks = results["checks"]
    assert list(checks) == ["environment", "methods", "attack_grads", "attack_precision", "kill_resume", "precision_layout",
                            "throughput", "profile", "compiled", "shared_gpu"]
    assert checks["environment"]["optional"] == {"duckdb": False, "ray": False, "optuna": False, "pyautoattack": True, "robustbench": True}
    assert len([k for k in checks["methods"] if "/" in k]) == 14  # seven methods, auto and fp32
    assert checks["kill_resume"]["rows"] == [0, 1] and checks["kill_resume"]["identical"]
    assert {row["method"] for row in checks["throughput"]["rows"]} == {"sat", "trades"}
    assert all(not v["recompiled_after_first_epoch"] for v in checks["compiled"].values() if isinstance(v, dict))
    assert checks["shared_gpu"]["processes"] == 2 and checks["shared_gpu"]["total_ips"] > 0
    assert "## throughput: ok" in (out / "gpu_check.md").read_text()
