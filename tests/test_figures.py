"""docs/figures.py redraws the phase figures of docs/phases.md from the stored rows of their runs
(tests/data/phases), and the page says what they show: the offline onset never before the lr drop."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from conftest import ROOT
from PIL import Image


def _figures() -> ModuleType:  # docs/ is not a package: load the script by its path
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "docs" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phase_figures_redraw_from_stored_rows_with_the_onset_after_the_drop_as_the_page_says(tmp_path: Path) -> None:
    shown = _figures().draw_phases(tmp_path)
    page = " ".join((ROOT / "docs" / "phases.md").read_text().split())
    names = {"fashion": "Fashion-MNIST", "digits": "digits"}
    assert set(shown) == set(names)
    for key, s in shown.items():
        assert s["png"] == tmp_path / f"phases-ro-sat-{key}.png" and (ROOT / "docs" / s["png"].name).is_file()
        with Image.open(s["png"]) as png:
            assert png.format == "PNG" and png.width > 800 and png.height > 800
        # both runs robust-overfit after their lr drop at epoch 40: the offline onset sits between
        # the drop and the online alarm, and the alarm the engine raised is the one the replay raises
        assert s["lr_drop"] == 40 and s["lr_drop"] <= s["onset"] <= s["alarm"] == s["replayed_alarm"], (key, s)
        stated = re.search(rf"The {names[key]} figure shows .*?: lr drop at epoch (\d+), offline onset (\d+), online alarm (\d+)", page)
        assert stated, f"docs/phases.md does not say what the {key} figure shows"
        assert tuple(map(int, stated.groups())) == (s["lr_drop"], s["onset"], s["alarm"]), (key, s)
