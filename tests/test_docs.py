"""The README documents every table column and every spec key that the code declares."""

from __future__ import annotations

import dataclasses

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
