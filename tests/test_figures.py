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
        # both runs robust-overfit from their lr drop at epoch 40 (the validation robust loss bottoms
        # at 41-42); the figure is labelled by today's detector, whose alarm it draws, and an onset
        # it places sits between the drop and the alarm
        assert s["lr_drop"] == 40 and s["alarm"] == s["replayed_alarm"] and 40 <= s["val_loss_onset"] <= 42, (key, s)
        if s["onset"] is not None:
            assert s["lr_drop"] <= s["onset"] <= s["alarm"], (key, s)
        stated = re.search(
            rf"The {names[key]} figure shows .*?: lr drop at epoch (\d+), offline onset (\w+), online alarm (\w+) "
            rf"\(raised in training: (\d+)\), validation robust-loss minimum (\d+)", page)
        assert stated, f"docs/phases.md does not say what the {key} figure shows"
        said = tuple(None if g == "none" else int(g) for g in stated.groups())
        assert said == (s["lr_drop"], s["onset"], s["alarm"], s["recorded_alarm"], s["val_loss_onset"]), (key, s)
