"""The README documents every table column and every spec key that the code declares; the
reliability doc quotes the suite's own figures and names, per guarantee, tests that exist."""

from __future__ import annotations

import dataclasses
import re

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
