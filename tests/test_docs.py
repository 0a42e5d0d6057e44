"""The reference pages document every table column (docs/tables.md) and every spec key
(docs/studies.md) that the code declares; the README opens with the two commands; every link in
the README and docs resolves, anchors included; the reliability doc quotes the suite's own figures
and names, per guarantee, tests that exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from conftest import ROOT

from analysis.schema import TABLES
from trainables.config import TrialConfig, flatten

README = (ROOT / "README.md").read_text()
TABLES_PAGE = (ROOT / "docs" / "tables.md").read_text()
STUDIES_PAGE = (ROOT / "docs" / "studies.md").read_text()


def test_tables_page_lists_every_column_of_every_table_in_that_tables_section() -> None:
    sections = dict(re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", TABLES_PAGE, re.M | re.S))
    for table, schema in TABLES.items():
        assert table in sections, f"docs/tables.md has no section ## `{table}`"
        rows = set(re.findall(r"^\| `(\w+)` \|", sections[table], re.M))
        for name in schema.names:
            assert name in rows, f"{table}.{name} missing from docs/tables.md"


def test_studies_page_mentions_every_spec_key() -> None:
    for key in flatten(dataclasses.asdict(TrialConfig())):
        assert f"`{key}`" in STUDIES_PAGE or f"`{key.rsplit('.', 1)[-1]}`" in STUDIES_PAGE, key


def test_studies_page_lists_every_study_key_in_its_table() -> None:
    from study.spec import StudyKeys

    table = STUDIES_PAGE.split("## Study keys", 1)[1]
    rows = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    for field in dataclasses.fields(StudyKeys):
        assert field.name in rows, f"study key {field.name} missing from docs/studies.md, Study keys"


def test_readme_opens_with_the_two_commands() -> None:
    head = README.split("##", 1)[0]
    assert "make demo" in head and "make test" in head


def test_reliability_doc_quotes_the_suites_own_figures() -> None:
    from test_bad_input import CASES
    from test_compaction import COMPACT_KILLS
    from test_kills import DRIVER_KILLS, EPOCHS, PROBE_ROWS, SAMPLES, WORKER_KILLS

    text = " ".join((ROOT / "docs" / "reliability.md").read_text().split())
    assert f"**{len(CASES)} bad inputs**" in text
    assert f"**{WORKER_KILLS + DRIVER_KILLS + 1 + len(COMPACT_KILLS)} kills**" in text  # + the S3 driver kill
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
_PATH = re.compile(r"(?<![\w/.])((?:docs|tests|examples|benchmarks|analysis|study|trainables)/[\w./-]+\.(?:md|py|yaml|png|csv(?:\.gz)?))")


def _help_texts() -> str:
    import argparse

    from study.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    return "\n".join(texts)


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation other than - and _
    dropped, spaces as hyphens, a repeated heading suffixed -1, -2, ...; code blocks hold none."""
    anchors: set[str] = set()
    repeats: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6} (.+)$", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n = repeats.get(slug, 0)
        anchors.add(f"{slug}-{n}" if n else slug)
        repeats[slug] = n + 1
    return anchors


def test_no_link_in_readme_docs_or_help_leaves_the_repository_or_points_at_a_missing_file() -> None:
    sources = {ROOT / "README.md": README, **{p: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}, ROOT / "--help": _help_texts()}
    assert {"studies.md", "tables.md", "stopping.md", "sampling.md", "results.md"} <= {p.name for p in sources}
    checked = 0
    for source, text in sources.items():
        base = source.parent
        for target in _LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (base / file).resolve() if file else source
            assert path.is_relative_to(ROOT) and path.exists(), f"{source.name}: link to {target}"
            if anchor and path.suffix == ".md":
                page = text if path == source else path.read_text()
                assert anchor in _anchors(page), f"{source.name}: link to {target}: {path.name} has no heading with that anchor"
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
