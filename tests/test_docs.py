"""The README documents every table column and every spec key that the code declares; the
reliability doc quotes the suite's own figures and names, per guarantee, tests that exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from analysis.schema import TABLES
from conftest import ROOT
from trainables.config import TrialConfig, flatten

README = (ROOT / "README.md").read_text()


def test_readme_lists_every_column_of_every_table() -> None:
    for table, schema in TABLES.items():
        for name in schema.names:
            assert f"`{name}`" in README, f"{table}.{name} missing from README"


def test_readme_mentions_every_spec_key() -> None:
    for key in flatten(dataclasses.asdict(TrialConfig())):
        assert f"`{key}`" in README or f"`{key.rsplit('.', 1)[-1]}`" in README, key


def test_readme_opens_with_the_two_commands() -> None:
    head = README.split("##", 1)[0]
    assert "make demo" in head and "make test" in head


def test_reliability_doc_quotes_the_suites_own_figures() -> None:
    from test_bad_input import CASES
    from test_kills import DRIVER_KILLS, EPOCHS, PROBE_ROWS, SAMPLES, WORKER_KILLS

    text = " ".join((ROOT / "docs" / "reliability.md").read_text().split())
    assert f"**{len(CASES)} bad inputs**" in text
    assert f"**{WORKER_KILLS + DRIVER_KILLS + 1} kills**" in text  # + the S3 driver kill
    assert f"{SAMPLES * EPOCHS} `epochs` rows, {SAMPLES * EPOCHS * PROBE_ROWS:,} `samples` rows" in text


def test_every_reliability_guarantee_names_tests_that_exist() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    guarantees = re.findall(r"^\*\*(\d+)\. ", text, re.M)
    table = text.split("## Guarantees and the tests that break them", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\d+)\. [^|]+\| (.+) \|$", table, re.M)}
    assert len(guarantees) >= 8 and sorted(rows, key=int) == guarantees, (guarantees, sorted(rows))
    for number, cell in rows.items():
        refs = re.findall(r"`(tests/\w+\.py)(?:::(\w+))?`", cell)
        assert refs, f"guarantee {number} names no test"
        for path, name in refs:
            source = (ROOT / path).read_text()
            assert not name or re.search(rf"^def {name}\(", source, re.M), f"guarantee {number}: {path}::{name} does not exist"


# What a user's clone holds is all the docs may point at: the team's notes beside the project are
# not in it (these names are spelled in pieces so that this file does not mention them itself)
_OUTSIDE = ("PAPER" + ".md", "DESIGN" + ".md", ".." + "/shared")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w/.])((?:docs|tests|examples|benchmarks|analysis|study|trainables)/[\w./-]+\.(?:md|py|yaml|png|csv))")


def _help_texts() -> str:
    import argparse

    from study.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    return "\n".join(texts)


def test_no_link_in_readme_docs_or_help_leaves_the_repository_or_points_at_a_missing_file() -> None:
    sources = {ROOT / "README.md": README, **{p: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}, ROOT / "--help": _help_texts()}
    checked = 0
    for source, text in sources.items():
        base = source.parent
        for target in _LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (base / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{source.name}: link to {target}"
            checked += 1
        for target in _PATH.findall(text):
            assert (ROOT / target).exists(), f"{source.name}: {target} does not exist"
            checked += 1
    assert checked > 20


def test_nothing_in_the_repository_points_at_the_teams_own_notes() -> None:
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    here = Path(__file__).relative_to(ROOT).as_posix()
    for name in tracked:
        path = ROOT / name
        if name == here or not path.is_file() or path.suffix in (".png", ".parquet", ".npz", ".gz"):
            continue
        text = path.read_text(errors="replace")
        for marker in _OUTSIDE:
            assert marker not in text, f"{name} mentions {marker}"
