"""Security basics: checkpoints cannot run code, a local Ray serves no dashboard beyond the
loopback, no credentials in the repository. (`query` is read-only: tests/test_bad_input.py.)"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import ROOT, TINY

from study.cli import main


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path: Path, capfd) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "epochs": 2}))
    out = tmp_path / "out"
    assert main(["train", str(spec), "--out", str(out)]) == 0
    marker = tmp_path / "code-ran"
    last = out / "checkpoints" / "train" / "last.pt"
    torch.save({"model": _Payload(marker)}, last)
    before = last.read_bytes()
    capfd.readouterr()
    assert main(["train", str(spec), "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt" in err[0] and "weights_only" in err[0], err
    assert not marker.exists() and last.read_bytes() == before


def test_the_local_ray_energyat_starts_serves_no_dashboard() -> None:
    # energyat's own local Ray (no --address) starts without the dashboard: no web UI to expose
    code = (
        "from study.runner import _init_ray; _init_ray(None); import ray; "
        "print(repr(ray._private.worker.global_worker.node.address_info.get('webui_url'))); "
        "import socket; print(socket.socket().connect_ex(('127.0.0.1', 8265)) != 0)"  # Ray's dashboard port: closed
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] in (["None", "True"], ["''", "True"]), proc.stdout


def test_every_ray_head_the_repository_starts_keeps_its_dashboard_on_loopback() -> None:
    # cluster.yaml, docs/cluster.md and the tests: every head node they start keeps its dashboard on 127.0.0.1 or off
    texts = {
        p: p.read_text()
        for p in [ROOT / "cluster.yaml", ROOT / "docs" / "cluster.md", *sorted(set((ROOT / "tests").glob("*.py")) - {Path(__file__)})]
    }
    heads = [(p.name, line) for p, text in texts.items() for line in text.splitlines() if "ray start" in line and "--head" in line]
    heads += [(p.name, line) for p, text in texts.items() for line in text.splitlines() if '"--head"' in line]
    assert heads
    for name, line in heads:
        assert "--dashboard-host=127.0.0.1" in line or "--include-dashboard=false" in line, (name, line)


# What a leaked secret looks like (the patterns of common secret scanners): AWS key ids, a
# 40-character secret after a secret-key name, private keys in PEM.
_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)secret[_-]?(access[_-]?)?key\W{1,4}[A-Za-z0-9/+=]{40}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_no_credentials_in_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "cluster.yaml" in files
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        found += [(name, m.group(0)[:12]) for pattern in _SECRETS for m in pattern.finditer(text)]
    assert found == []
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert "aws_secret_access_key" not in str(cluster).lower() and "aws_access_key_id" not in str(cluster).lower()


def test_a_directory_named_like_a_glob_is_read_as_itself(tmp_path: Path, capfd) -> None:
    # `exp[1]` as a DuckDB glob matches `exp1`: the directory's own name must be escaped, or a
    # query of one study reads another's rows (or none)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "epochs": 1}))
    bracketed = tmp_path / "exp[1]"
    assert main(["train", str(spec), "--out", str(bracketed)]) == 0
    lookalike = tmp_path / "exp1"
    shutil.copytree(bracketed, lookalike)
    for table in ("epochs", "samples", "evals"):
        shutil.rmtree(lookalike / "tables" / table)
    capfd.readouterr()
    sql = "select (select count(*) from epochs), (select count(*) from samples) > 0, (select count(*) from evals) > 0"
    assert main(["query", str(bracketed), sql, "--format", "csv"]) == 0
    assert capfd.readouterr().out.splitlines()[1] == "1,true,true"


def test_a_symbolic_link_in_tables_cannot_lead_a_query_outside(tmp_path: Path) -> None:
    # DuckDB checks a link's target against the allowed folder, not only its name: a link planted
    # in tables/ (by whoever can write the study's folder) reads nothing outside it
    from analysis.errors import QueryError
    from analysis.query import run_query

    (tmp_path / "secret.txt").write_text("not for queries\n")
    tables = tmp_path / "study" / "tables"
    tables.mkdir(parents=True)
    (tables / "inside.txt").write_text("a file of the study\n")
    (tables / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert run_query(tmp_path / "study", f"select content from read_text('{tables / 'inside.txt'}')").to_pylist() == [
        {"content": "a file of the study\n"}
    ]
    try:
        run_query(tmp_path / "study", f"select content from read_text('{tables / 'link.txt'}')")
    except QueryError as exc:
        assert "query refused" in str(exc) and "not for queries" not in str(exc)
    else:
        raise AssertionError("a link out of tables/ was followed")
