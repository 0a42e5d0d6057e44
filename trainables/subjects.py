"""Models to evaluate, probe and sample from: energyat's own trials, and any other model.

`energyat eval`, `landscape` and `sample` work on a :class:`Subject`, from one of three sources:

- ``trial``: a trial of a study (its spec and the best checkpoint in its latest Tune checkpoint)
  or of an ``energyat train --out`` directory (:func:`trial_subject`);
- ``checkpoint``: a researcher's own weights, a plain ``state_dict`` file for one of energyat's
  architectures (:func:`checkpoint_subject`). The architectures keep the reference code's
  parameter names (Rice et al.'s PreActResNet-18, kuangliu's ResNet-18, TRADES' WRN-34-10),
  so their checkpoints load as they are; a DataParallel ``module.`` prefix is stripped;
- ``robustbench``: a model of the RobustBench zoo through ``robustbench``'s own ``load_model``
  (:func:`robustbench_subject`), which downloads weights unless they are already in its
  ``model_dir``.

Every model takes inputs in [0, 1]; a RobustBench model that normalises inside keeps doing so.
"""

from __future__ import annotations

import difflib
import json
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from analysis.errors import EnergyatError, StoreError, one_line
from analysis.store import check_name, check_schema_version, is_uri
from trainables import checkpoint
from trainables.config import MODEL_NAMES, TrialConfig, parse_trial, trial_spec
from trainables.data import ImageData
from trainables.models import build_model
from trainables.zoo import import_robustbench

Source = Literal["trial", "checkpoint", "robustbench"]
# what RobustBench evaluates at, per threat model, when --eps is not given
ROBUSTBENCH_EPS = {"linf": 8 / 255, "l2": 0.5}
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100")  # the zoo's datasets that energyat can load


@dataclass(frozen=True)
class Subject:
    """A model under study, with the data and threat model to study it on."""

    name: str  # the trial id, or the name of a model from outside: `trial_id` in the tables
    source: Source
    cfg: TrialConfig  # dataset, threat model (attack.*), eval steps, probe sizes, batch size
    weights: str  # checkpoint path, or robustbench:<name>/<dataset>/<threat>
    method: str | None  # the trial's AT method; None for a model from outside
    architecture: str  # energyat's registry name, or the RobustBench model name
    study: str
    load: Callable[[ImageData], nn.Module]  # the model, fp32, eval mode, on the CPU

    def model(self, data: ImageData, device: torch.device) -> nn.Module:
        """The model on `device` in the engine's layout (channels_last), eval mode: the same
        weights then give the same arithmetic, so `energyat eval` reproduces a trial's final
        evaluation exactly."""
        return self.load(data).to(device).to(memory_format=torch.channels_last).eval()

    @property
    def label(self) -> str:
        """How figures and tables name it: the method for trials, the source otherwise."""
        return self.method if self.method is not None else self.source


# -- energyat's own trials ------------------------------------------------------------------------


def best_trial(directory: str | Path) -> str:
    """The id of the trial with the highest best validation robust accuracy (the `trials` table)."""
    from analysis.query import open_tables

    con = open_tables(directory, views=("trials",))
    try:
        found = con.execute(
            "select trial_id from trials where best_val_robust_acc = best_val_robust_acc "
            "order by best_val_robust_acc desc, trial_id limit 1"
        ).fetchall()
    finally:
        con.close()
    if not found:
        raise StoreError(f"{directory} has no trial with a validation robust accuracy yet; name one with --trial ID")
    return str(found[0][0])


def _spec_document(spec_file: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise StoreError(f"{spec_file} is not valid YAML ({one_line(exc)}); restore it from a copy") from exc
    if not isinstance(document, dict):
        raise StoreError(f"{spec_file} is not an energyat spec (not a mapping); restore it from a copy")
    check_schema_version(document.get("schema_version"), where=str(spec_file.parent))
    return document


def trial_subject(directory: str | Path, trial_id: str, *, epoch: int | None = None, last: bool = False) -> Subject:
    """The spec and best checkpoint of `trial_id` in a local study or train-output directory
    (``best``: the trial with the highest best validation robust accuracy). With `epoch`, the
    checkpoint kept when that epoch was the new best (``best-e<epoch>.pt``, from
    `keep_best_checkpoints`) instead of the last best; with `last`, the last epoch's (``last.pt``)."""
    if last and epoch is not None:
        raise EnergyatError("give an epoch's kept checkpoint or the last one, not both")
    name = "last.pt" if last else "best.pt" if epoch is None else f"best-e{epoch:04d}.pt"
    trial_id = best_trial(directory) if trial_id == "best" else check_name(trial_id, "--trial")
    if is_uri(directory):
        raise EnergyatError(f"{directory}: checkpoints are read from a local directory; copy the study (spec.yaml, tune/<trial>) to disk first")
    root = Path(directory).expanduser()
    spec_file = root / "spec.yaml"
    if not spec_file.is_file():
        raise StoreError(f"{directory} holds no spec.yaml; give a study directory or an `energyat train --out` directory")
    document = _spec_document(spec_file)
    if "study_name" in document:  # a study: the trial's own parameters live in its Tune folder
        folder = root / "tune" / trial_id
        if not (folder / "params.json").is_file():
            known = sorted(p.parent.name for p in (root / "tune").glob("*/params.json"))
            raise StoreError(f"no trial `{trial_id}` in {directory}; known trial ids: {', '.join(known) or 'none yet'}")
        raw = trial_spec(document["spec"], json.loads((folder / "params.json").read_text()))
        candidates = sorted(folder.glob(f"checkpoint_*/{name}"))  # Tune numbers them in order
    else:  # an `energyat train` output: the resolved spec, checkpoints under checkpoints/<trial>
        raw = {k: v for k, v in document.items() if k != "schema_version"}
        candidates = [root / "checkpoints" / trial_id / name]
        if not candidates[0].parent.is_dir():
            known = sorted(p.name for p in (root / "checkpoints").glob("*"))
            raise StoreError(f"no trial `{trial_id}` in {directory}; known trial ids: {', '.join(known) or 'none'}")
    found = [c for c in candidates if c.is_file()]
    if not found and epoch is not None:
        raise StoreError(f"trial `{trial_id}` in {directory} kept no checkpoint of epoch {epoch} (kept only with keep_best_checkpoints, "
                         "and only for epochs that were a new best)")
    if not found:
        raise StoreError(f"trial `{trial_id}` in {directory} has no best checkpoint yet (it is written at the first probed epoch)")
    cfg, best = parse_trial(raw), found[-1]

    def load(data: ImageData) -> nn.Module:
        model = _build(cfg, data)
        model.load_state_dict(checkpoint.load(best)["model"])
        return model.eval()

    return Subject(trial_id, "trial", cfg, str(best), cfg.method, cfg.model, cfg.name, load)


def trial_ids(directory: str | Path) -> list[str]:
    """The trials of a study or train-output directory that have a best checkpoint."""
    root = Path(directory).expanduser()
    found = {p.parent.parent.name for p in root.glob("tune/*/checkpoint_*/best.pt")}
    found |= {p.parent.name for p in root.glob("checkpoints/*/best.pt")}
    return sorted(found)


def _build(cfg: TrialConfig, data: ImageData) -> nn.Module:
    return build_model(cfg.model, in_channels=data.train_x.shape[1], num_classes=data.num_classes,
                       image_size=data.train_x.shape[-1], width=cfg.width, init=cfg.model_init)


# -- models from outside ---------------------------------------------------------------------------


def outside_config(*, dataset: str, root: str, download: bool, norm: str, eps: float | None, n: int | None,
                   eval_steps: int, batch_size: int, model: str = "small_cnn", width: int = 1) -> TrialConfig:
    """The configuration a model from outside is studied with, validated like a spec.

    `eps` None takes RobustBench's radius for the norm (8/255 L-inf, 0.5 L2). `n` test images
    make the landscape's probe (None: 1,000). The PGD step is the derived `attack.step`,
    2.5 * eps / 10: 2/255 at 8/255, the paper's evaluation step.
    """
    spec = {
        "name": "outside",
        # nothing is selected for a model from outside: hold out as little as the loader allows
        "dataset": {"name": dataset, "root": root, "download": download, "val_size": 1},
        "model": model,
        "width": width,
        "attack": {"norm": norm, "eps": ROBUSTBENCH_EPS[norm] if eps is None else eps},
        "eval_attack": {"steps": eval_steps},
        "probe": {"test_size": 1000 if n is None else n},
        "batch_size": batch_size,
    }
    return parse_trial(spec)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`: a plain ``state_dict``, or one under ``state_dict`` or ``model``
    (RobustBench's and energyat's own files), with DataParallel's ``module.`` prefix stripped.
    Loaded with ``weights_only=True``: a file holding code is refused before any of it runs."""
    if not path.is_file():
        raise EnergyatError(f"--checkpoint {path} is not a file")
    try:
        state: Any = checkpoint.load(path)
    except (RuntimeError, EOFError, OSError) as exc:  # truncated, empty or not a torch file
        raise StoreError(f"--checkpoint {path} is not a readable torch checkpoint ({one_line(exc)[:200]})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(list(state)[:5]) if isinstance(state, Mapping) else type(state).__name__
        raise StoreError(f"--checkpoint {path} holds no state dict of tensors (found: {keys}); save model.state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, hint: str) -> nn.Module:
    """Load `state` into `model`, every key accounted for and every shape right; otherwise one
    line naming the missing and unexpected keys and the shapes that differ."""
    expected = model.state_dict()
    shapes = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if k in expected and v.shape != expected[k].shape}
    # torch applies the model's own load hooks (WRN-34-10 drops TRADES' unused sub_block1)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=False)
    missing = [k for k in result.missing_keys if k not in shapes]
    if missing or result.unexpected_keys or shapes:
        def some(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" if keys else "none"

        sizes = "; ".join(f"{k} is {a} in the file, {b} in the model" for k, (a, b) in list(shapes.items())[:2])
        raise EnergyatError(
            f"{what} does not fit {hint}: missing keys {some(missing)}, unexpected keys {some(list(result.unexpected_keys))}"
            + (f", {len(shapes)} shape(s) differ ({sizes})" if shapes else "")
        )
    return model.eval()


# Per-channel mean and std some reference code normalises inputs with before its model: Rice et
# al.'s robust_overfitting and Wong et al.'s fast_adversarial (both `cifar10_mean`, `cifar10_std`
# in their utils.py, the statistics of CIFAR-10's training images). Their checkpoints expect
# normalised inputs; energyat's architectures take [0, 1] pixels, so `--normalize cifar10` puts the
# normalisation in front of the model (RobustBench's Rice2020Overfitting and Wong2020Fast do the same).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}


class Normalized(nn.Module):
    """`model` fed (x - mean) / std: inputs stay in [0, 1] for every attack, as for the rest."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return self.model((x - mean) / std)


def checkpoint_subject(path: str | Path, *, architecture: str, cfg: TrialConfig, name: str | None, study: str,
                       normalize: str | None = None) -> Subject:
    """A state-dict file for one of energyat's architectures (`architecture`, with `cfg.width`);
    `normalize` names the input normalisation its training code applied (NORMALIZATIONS)."""
    if architecture not in MODEL_NAMES:
        raise EnergyatError(f"--model {architecture!r}: choose one of {', '.join(MODEL_NAMES)}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise EnergyatError(f"--normalize {normalize!r}: choose one of none, {', '.join(NORMALIZATIONS)}")
    file = Path(path).expanduser()
    state = load_state_dict_file(file)  # now: a bad file is one line before any data is loaded
    label = check_name(name if name is not None else file.stem, "--name" if name is not None else "the checkpoint's file stem (give --name)")

    def load(data: ImageData) -> nn.Module:
        model = _fit(_build(cfg, data), state, what=f"--checkpoint {file}",
                     hint=f"--model {architecture} (width {cfg.width}) on {cfg.dataset.name}, {data.num_classes} classes")
        if normalize is None:
            return model
        mean, std = NORMALIZATIONS[normalize]
        if data.train_x.shape[1] != len(mean):
            raise EnergyatError(f"--normalize {normalize} has {len(mean)} channels; {cfg.dataset.name} images have {data.train_x.shape[1]}")
        return Normalized(model, mean, std).eval()

    return Subject(label, "checkpoint", cfg, str(file.resolve()), None, architecture, study, load)


def robustbench_subject(model_name: str, *, cfg: TrialConfig, models_dir: str | Path, study: str) -> Subject:
    """A RobustBench model, through ``robustbench.utils.load_model`` (it downloads the weights
    into ``<models_dir>/<dataset>/<threat>/<name>.pt`` unless they are already there)."""
    dataset, norm = cfg.dataset.name, cfg.attack.norm
    if dataset not in ROBUSTBENCH_DATASETS:
        raise EnergyatError(f"--dataset {dataset}: RobustBench models are loaded for {', '.join(ROBUSTBENCH_DATASETS)} here")
    threat = {"linf": "Linf", "l2": "L2"}[norm]
    rb = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if model_name not in zoo:
        close = difflib.get_close_matches(model_name, list(zoo), n=3)
        raise EnergyatError(
            f"--robustbench {model_name!r} is not a {dataset} {threat} model of RobustBench"
            + (f"; did you mean {', '.join(close)}?" if close else "; see the leaderboard at robustbench.github.io")
        )
    check_name(model_name, "--robustbench")
    folder = Path(models_dir).expanduser()

    def load(data: ImageData) -> nn.Module:
        where = folder / dataset / threat / f"{model_name}.pt"
        present = where.is_file()
        try:
            model = rb.utils.load_model(model_name, model_dir=str(folder), dataset=dataset, threat_model=threat)
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
            # absent: the download failed (requests' and gdown's errors are OSErrors); present: the
            # file is not the checkpoint load_model expects for this model (damaged, or another one's)
            problem = f"{type(exc).__name__}: {one_line(exc)[:200]}"
            if present:
                raise EnergyatError(
                    f"{where} is not a checkpoint RobustBench's load_model can read for {model_name} ({problem}); delete it to download it again"
                ) from exc
            raise EnergyatError(
                f"cannot download RobustBench model {model_name} ({problem}); with no network, place its checkpoint at {where}"
            ) from exc
        return model.float().eval()

    return Subject(model_name, "robustbench", cfg, f"robustbench:{model_name}/{dataset}/{threat}", None, model_name, study, load)
