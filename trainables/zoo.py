"""RobustBench's model zoo, imported the way its PyPI release needs (an optional extra).

``pip install energyat[robustbench]`` brings ``robustbench`` (Croce et al.'s model zoo) and
``pyautoattack`` (Croce and Hein's original AutoAttack). Two things stand between robustbench
1.1.1, the latest release on PyPI, and an import:

- its ``eval.py`` imports the module ``autoattack``, while the package it declares,
  ``pyautoattack``, installs that very code as the module ``pyautoattack`` (GitHub's
  ``fra31/auto-attack`` installs it as ``autoattack``, which PyPI does not carry). The two
  names are aliased here, and only where no ``autoattack`` module is installed;
- its ``loaders.py`` imports ``pkg_resources``, which setuptools 81 removed: the extra pins
  ``setuptools<81``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from types import ModuleType

from analysis.errors import EnergyatError

INSTALL_HINT = "pip install 'energyat[robustbench]'"


def import_robustbench() -> ModuleType:
    """The ``robustbench`` package, imported; one clear error when the extra is missing."""
    try:
        import pyautoattack
        import pyautoattack.state
    except ImportError as exc:
        raise EnergyatError(f"RobustBench models need the robustbench extra ({exc}); {INSTALL_HINT}") from exc
    if importlib.util.find_spec("autoattack") is None:
        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = pyautoattack.state
    try:
        with warnings.catch_warnings():
            # pkg_resources (setuptools 80) warns at import that it is deprecated; nothing to act on here
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)  # timm's import of torch.jit.interface
            return importlib.import_module("robustbench")
    except ImportError as exc:
        raise EnergyatError(f"RobustBench models need the robustbench extra ({exc}); {INSTALL_HINT}") from exc
