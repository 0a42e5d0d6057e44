"""One trial's configuration: typed dataclasses, parsed and validated before any work.

A spec (YAML, or the dict Ray Tune hands a trial) is a nested mapping. :func:`parse_trial`
turns it into a :class:`TrialConfig` or raises :class:`SpecError` naming the offending key;
nothing is loaded or written before that. Study-only keys (``samples``, ``search`` ...) are
validated in ``study/spec.py`` and ignored here.

Units: ``eps`` and ``step`` are in the [0, 1] input scale (8/255 means 8 grey levels); a spec
may write them as fractions such as ``"8/255"``, parsed with :class:`fractions.Fraction`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, Literal, get_args, get_type_hints

from analysis.errors import SpecError, unknown_choice
from analysis.store import SAFE_NAME

Norm = Literal["linf", "l2"]
# the keys of trainables.methods.METHODS, in its order (a Literal, so mypy and the spec parser see
# each name; that module imports this one, so it cannot be built from the registry)
MethodName = Literal["standard", "sat", "trades", "weat", "der", "fgsm_rs", "mart"]
ModelName = Literal["small_cnn", "tiny_cnn", "cnn_fc", "preact_resnet18", "resnet18", "wrn34_10"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
DatasetName = Literal["digits", "fashion_mnist", "cifar10", "cifar100", "svhn", "npz"]
ScheduleName = Literal["piecewise", "onecycle", "cosine"]
DeviceName = Literal["auto", "cpu", "cuda"]
# the validation metrics that can pick a trial's best epoch (`select`)
SelectMetric = Literal["val_robust_acc", "val_clean_acc"]

# Keys a study spec may carry that one trial does not use (validated by study/spec.py).
STUDY_KEYS = frozenset(
    {"samples", "search", "objective", "early_stop", "resources", "max_concurrent", "storage", "max_failures", "hang_timeout",
     "sampler", "points_to_evaluate", "loggers", "scheduler"}
)


@dataclass(frozen=True)
class DatasetConfig:
    name: DatasetName = "digits"
    root: str = "~/data"  # where torchvision-format files live (or the .npz file for `npz`)
    download: bool = False  # fetch missing files from the dataset's home (needs a network)
    train_size: int | None = None  # keep this many training images (seeded), None = all
    label_noise: float = 0.0  # fraction of training labels replaced by a random other class
    # images held out from the training set (seeded, before `train_size` is drawn) to select the
    # best epoch, the searcher's objective and the stop rule's patience: never the test set
    # (Rice et al. 2020 hold out 1,000). None = the dataset's default (DEFAULT_VAL_SIZE; npz:
    # 10% of its training images)
    val_size: int | None = None
    seed: int = 0  # seeds the digits/npz split, the validation split, the subsample and the label noise, not training
    pool: int = 1  # average-pool images by this factor at load time (2: Fashion-MNIST 28 -> 14)
    # Augmentation on the device: random crop with this much zero padding, horizontal flip.
    # None = the dataset's own default (32x32 sets: pad 4 + flip; SVHN no flip; digits none).
    crop_pad: int | None = None
    flip: bool | None = None

    def __post_init__(self) -> None:
        if self.val_size is None and self.name in DEFAULT_VAL_SIZE:
            object.__setattr__(self, "val_size", DEFAULT_VAL_SIZE[self.name])


# Validation images per dataset when `dataset.val_size` is not given: Rice et al.'s 1,000 where
# the training set is large; digits (1,797 images in all) keeps 200 of its 1,400 training images.
DEFAULT_VAL_SIZE: dict[str, int] = {"digits": 200, "fashion_mnist": 1000, "cifar10": 1000, "cifar100": 1000, "svhn": 1000}
NPZ_VAL_FRACTION = 0.1  # an npz's default validation share of its training images


@dataclass(frozen=True)
class AttackConfig:
    """The training attack's threat model; also the probes' and, with `eval_attack`, the test's."""

    eps: float = 8 / 255  # radius of the threat ball, input scale [0, 1]
    # PGD step size, input scale; None = 2.5 * eps / steps (Madry et al.'s `robustness` library):
    # 2/255 for eps 8/255 and 10 steps, and it scales with eps, which an L2 ball needs
    step: float | None = None
    steps: int = 10  # PGD iterations (training and probe attacks)
    norm: Norm = "linf"
    fgsm_step: float | None = None  # FGSM-RS step; None = 1.25 * eps (Wong et al. 2020)
    # batch-norm mode while crafting the *training* x*: auto = the method's reference (trainables.methods: Method.bn).
    # Probes and every evaluation craft in eval mode whatever this says.
    bn: Literal["auto", "train", "eval"] = "auto"
    # the training attack's start: auto = the method's reference (trainables.methods: Method.start)
    start: Literal["auto", "uniform", "gaussian"] = "auto"

    def __post_init__(self) -> None:
        if self.step is None and isinstance(self.steps, int) and self.steps >= 1:
            object.__setattr__(self, "step", 2.5 * self.eps / self.steps)


@dataclass(frozen=True)
class EvalAttackConfig:
    """The per-epoch test attack: PGD with random start, same eps/step/norm as `attack`."""

    steps: int = 20


@dataclass(frozen=True)
class ProbeConfig:
    train_size: int = 1000  # fixed training images probed every `every` epochs (no augmentation)
    # fixed test images: a per-epoch test curve (accuracy, robust accuracy, energies) for the
    # figures, which selects nothing (the validation split does); 0 = no test curve
    test_size: int = 1000
    every: int = 1  # probe and evaluate the validation split every this many epochs (the last epoch always)
    samples_every: int = 1  # write per-sample rows every this many probed epochs (0 = never)
    # which per-epoch adversarial examples are crafted in the training precision (bf16 under bf16
    # training: crafting is most of a probe's cost): `probes`, the training and test probes;
    # `all`, the validation split's too (which selects: on the quickstart its robust accuracy
    # moved by up to 3 of 400 images per epoch and SAT's pick moved from epoch 25 to 28); `fp32`,
    # none. Energies and accuracies are computed in fp32 either way; the final evaluation is fp32 end to end.
    craft: Literal["probes", "all", "fp32"] = "probes"


@dataclass(frozen=True)
class WeatConfig:
    """WEAT's weighting family: w = softplus(|E| / tau) ** (-power) (docs/science.md section 3)."""

    tau: float = 1.0
    power: float = 1.0  # 0 gives plain TRADES
    normalize: bool = False  # divide w by its batch mean (the released code does not)
    energy: Literal["natural", "adversarial"] = "natural"  # which sample's E(x) sets w
    variant: Literal["adv", "nat"] = "adv"  # CE on x* (WEAT_adv) or on x (WEAT_nat)


@dataclass(frozen=True)
class DerConfig:
    """Delta Energy Regularizer: beta * max(||[dE(x), dE(x,y)]||_2 - gamma, 0)."""

    gamma: float = 0.0
    single_step: bool = False  # craft x* with FGSM-RS and gate the penalty on AAE samples


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the weights, batch-norm statistics included, updated
    after every optimiser step (docs/remedies.md). With it on, every evaluation reads the average:
    validation, the energy probes, selection, best.pt, the final evaluation and `energyat eval`;
    the live weights keep training (the `train_*` columns are theirs)."""

    decay: float = 0.0  # 0 = off; e.g. 0.999 (an average over about 1 / (1 - decay) steps)
    start: int = 0  # the epoch the average starts accumulating; before it, it follows the live weights


@dataclass(frozen=True)
class AwpConfig:
    """Adversarial weight perturbation (trainables/awp.py, docs/remedies.md): each batch's loss is
    taken at weights moved by `gamma` times each layer's norm up the method's loss."""

    gamma: float = 0.0  # 0 = off; the reference's 0.01 for PGD-AT, 0.005 for TRADES
    warmup: int | None = None  # epochs before it starts; None = the method's reference (TRADES and WEAT 10, others 0)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule; `lr` is the peak (onecycle) or starting (piecewise, cosine) rate."""

    name: ScheduleName = "piecewise"
    milestones: tuple[float, ...] = (0.5, 0.75)  # piecewise: epochs, or fractions of `epochs` if < 1
    gamma: float = 0.1  # piecewise: multiply lr by this at each milestone
    pct_start: float = 0.25  # onecycle: fraction of steps spent warming up
    div_factor: float = 25.0  # onecycle: initial lr = lr / div_factor (torch's OneCycleLR)
    final_div_factor: float = 1e4  # onecycle: final lr = initial lr / final_div_factor
    # onecycle: SGD momentum cycles inversely to the lr, max_momentum -> base_momentum at the peak
    # lr -> max_momentum, as torch's OneCycleLR does by default (and the WEAT code with it); the
    # spec's `momentum` is then not used. Off by default: momentum stays `momentum`.
    cycle_momentum: bool = False
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass(frozen=True)
class FinalEvalConfig:
    """Evaluation of the best checkpoint on the test set once training ends (fp32, eval mode).

    Both counts take the *first* images of the test split, as RobustBench does; published tables
    use the whole test set (docs/evaluation.md).
    """

    n: int | None = None  # test images for clean and PGD accuracy; None = the whole test set
    pgd_steps: int = 50
    # test images for the original AutoAttack (standard version); None = the whole test set,
    # 0 = skip (the column is NaN)
    autoattack_n: int | None = None


@dataclass(frozen=True)
class SgldConfig:
    """SGLD on the joint energy (`energyat sample`, trainables/sgld.py; docs/science.md section 5)."""

    steps: int = 50
    eta: float = 0.8  # step size on grad_x E(x, y)
    momentum: float = 0.9  # zeta; the authors' code gives none: 0.9 as in SGD with momentum
    noise: float = 0.001  # sigma, std of the Gaussian noise added each step
    pca_sigma: float = 0.005
    pca_variance: float = 0.95  # fraction of the class's variance its principal directions keep


@dataclass(frozen=True)
class TrialConfig:
    name: str = "trial"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelName = "small_cnn"
    width: int = 1  # channel multiplier of small_cnn (32-64-128) and cnn_fc (64-64-128, 512 units)
    # weight initialisation: `reference` = the model's reference code (TRADES' He-normal for
    # wrn34_10, torch's default for the others); `torch` = torch's default everywhere
    model_init: Literal["reference", "torch"] = "reference"
    method: MethodName = "sat"
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval_attack: EvalAttackConfig = field(default_factory=EvalAttackConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    beta: float = 6.0  # TRADES / WEAT / MART KL weight, DER penalty weight
    weat: WeatConfig = field(default_factory=WeatConfig)
    der: DerConfig = field(default_factory=DerConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    awp: AwpConfig = field(default_factory=AwpConfig)
    final_eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    seed: int = 0
    # the validation metric whose best epoch is kept (best.pt, the best_val_* columns, what the final
    # evaluation reads); `auto`: the method's (trainables.methods.Method.select), robust accuracy for
    # every AT method and clean accuracy for `standard`
    select: Literal["auto", "val_robust_acc", "val_clean_acc"] = "auto"
    # keep a copy of every new best checkpoint as best-e<epoch>.pt beside best.pt: the best epoch
    # up to any stop is one of them, so a stop rule replayed on the rows afterwards can have its
    # pick evaluated (benchmarks/stoppers.py)
    keep_best_checkpoints: bool = False
    device: DeviceName = "auto"
    threads: int | None = None  # torch CPU threads; None = torch's default
    compile: bool = False  # torch.compile the model: 77 s to compile small_cnn on the CPU, no gain there (BENCHMARKS.md)
    # torch.compile's mode (inductor): `reduce-overhead` captures the hot loop in CUDA graphs, which
    # pays on a GPU when kernel launches, not arithmetic, bound a batch (small models and batches);
    # `max-autotune` also searches kernel configurations (long compiles). docs/gpu.md says when.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # `aot_eager`: AOTAutograd's graphs run without code generation. It compiles in seconds, so it
    # shows graph breaks, recompiles and the traced backward quickly (tests/test_compile.py); no speed
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    # the *training* arithmetic (every evaluation is fp32): auto = bf16 autocast on CUDA and on
    # CPUs with AMX (Intel Xeon 4th generation and later: 2-4x faster there, BENCHMARKS.md), fp32
    # elsewhere (trainables.precision.training_precision; `trials.train_precision` records which).
    # Runs in bf16 and in fp32 are not bit-comparable: `fp32` pins it across machines
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML/JSON types (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys, in declaration order: {"weat": {"tau": 1}} -> {"weat.tau": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_number(key: str, value: Any) -> float:
    """A float from a number or a fraction string like "8/255" (no eval)."""
    if isinstance(value, bool):
        raise SpecError(key, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    raise SpecError(key, f"expected a number or a fraction like 8/255, got {value!r}")


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Check `value` against a type hint; returns the converted value or raises SpecError."""
    origin = getattr(hint, "__origin__", None)
    args = get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class, never an instance
        if not isinstance(value, Mapping):
            raise SpecError(key, f"expected a mapping of {hint.__name__} keys, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise unknown_choice(key, value, args)
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, inner[0], value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(key, f"expected a whole number, got {value!r}")
        return value
    if hint is float:
        number = parse_number(key, value)
        if not math.isfinite(number):
            raise SpecError(key, f"expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(key, f"expected text, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(key, f"expected a list, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    raise TypeError(f"config hint {hint!r} for {key} has no converter")  # a bug, not input


def _build(cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            nearby = ", ".join(sorted(names))
            raise SpecError(f"{prefix}{key}", f"unknown key; known keys here: {nearby}")
        kwargs[key] = _convert(f"{prefix}{key}", hints[key], value)
    return cls(**kwargs)


def parse_trial(spec: Mapping[str, Any]) -> TrialConfig:
    """Validate a spec mapping into a :class:`TrialConfig`.

    Study-only keys are skipped. A bare string for `schedule` names the schedule.
    Raises :class:`SpecError` naming the first bad key.

    Example::

        cfg = parse_trial({"method": "trades", "attack": {"eps": "8/255"}, "beta": 6})
        assert abs(cfg.attack.eps - 8 / 255) < 1e-12
    """
    if not isinstance(spec, Mapping):
        raise SpecError("<spec>", f"expected a mapping of keys, got {type(spec).__name__}")
    data = {k: v for k, v in spec.items() if k not in STUDY_KEYS}
    if isinstance(data.get("schedule"), str):
        data["schedule"] = {"name": data["schedule"]}
    if isinstance(data.get("dataset"), str):
        data["dataset"] = {"name": data["dataset"]}
    cfg: TrialConfig = _build(TrialConfig, data)
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg: TrialConfig) -> None:
    """Value checks that types cannot express. Each names its key."""
    checks: list[tuple[str, bool, str]] = [
        ("name", SAFE_NAME.fullmatch(cfg.name) is not None,
         f"{cfg.name!r}: use 1-128 letters, digits, `_`, `.` or `-`, starting with a letter or digit (it names the study's folder)"),
        ("epochs", cfg.epochs >= 1, "must be at least 1"),
        ("batch_size", cfg.batch_size >= 2, "must be at least 2 (batch norm needs 2 samples)"),
        ("lr", cfg.lr > 0, "must be positive"),
        ("momentum", 0 <= cfg.momentum < 1, "must be in [0, 1)"),
        ("weight_decay", cfg.weight_decay >= 0, "must be non-negative"),
        ("width", cfg.width >= 1, "must be at least 1"),
        ("attack.eps", 0 <= cfg.attack.eps <= 1, "must be in [0, 1] (input scale; 8/255 is allowed)"),
        ("attack.steps", cfg.attack.steps >= 1, "must be at least 1"),
        # None only when `steps` is invalid (no step derived), which the line above reports
        ("attack.step", cfg.attack.step is None or 0 < cfg.attack.step <= 1, "must be in (0, 1]"),
        ("eval_attack.steps", cfg.eval_attack.steps >= 1, "must be at least 1"),
        ("probe.train_size", cfg.probe.train_size >= 1, "must be at least 1"),
        ("probe.test_size", cfg.probe.test_size >= 0, "must be non-negative (0: no per-epoch test curve)"),
        ("probe.every", cfg.probe.every >= 1, "must be at least 1"),
        ("probe.samples_every", cfg.probe.samples_every >= 0, "must be non-negative"),
        ("beta", cfg.beta >= 0, "must be non-negative"),
        ("weat.tau", cfg.weat.tau > 0, "must be positive"),
        ("der.gamma", cfg.der.gamma >= 0, "must be non-negative"),
        ("ema.decay", 0 <= cfg.ema.decay < 1, "must be in [0, 1) (0: no average)"),
        ("awp.gamma", 0 <= cfg.awp.gamma <= 1, "must be in [0, 1] (a fraction of each layer's weight norm; 0: off)"),
        ("awp.warmup", cfg.awp.warmup is None or cfg.awp.warmup >= 0, "must be non-negative"),
        ("ema.start", 0 <= cfg.ema.start < max(cfg.epochs, 1), f"must be an epoch of the run, 0 to {cfg.epochs - 1}"),
        ("dataset.label_noise", 0 <= cfg.dataset.label_noise < 1, "must be in [0, 1)"),
        ("final_eval.pgd_steps", cfg.final_eval.pgd_steps >= 1, "must be at least 1"),
        ("schedule.gamma", 0 < cfg.schedule.gamma <= 1, "must be in (0, 1]"),
        ("schedule.pct_start", 0 < cfg.schedule.pct_start < 1, "must be in (0, 1)"),
        ("schedule.base_momentum", 0 <= cfg.schedule.base_momentum <= cfg.schedule.max_momentum,
         f"must be in [0, schedule.max_momentum = {cfg.schedule.max_momentum}]"),
        ("schedule.max_momentum", 0 <= cfg.schedule.max_momentum < 1, "must be in [0, 1)"),
        ("schedule.cycle_momentum", not cfg.schedule.cycle_momentum or cfg.schedule.name == "onecycle",
         f"cycles momentum with the onecycle schedule only (schedule.name is {cfg.schedule.name}); set it false"),
        ("compile_backend", cfg.compile or cfg.compile_backend == "inductor", "applies with `compile: true` only"),
        ("compile_mode", cfg.compile or cfg.compile_mode == "default", "applies with `compile: true` only"),
        ("compile_mode", cfg.compile_backend == "inductor" or cfg.compile_mode == "default",
         f"is inductor's; the {cfg.compile_backend} backend has no modes"),
    ]
    if cfg.final_eval.autoattack_n is not None:
        checks.append(
            ("final_eval.autoattack_n", cfg.final_eval.autoattack_n >= 0, "must be non-negative (0 skips AutoAttack, null takes the whole test set)")
        )
    if cfg.dataset.val_size is not None:
        checks.append(
            (
                "dataset.val_size",
                cfg.dataset.val_size >= 1,
                "must be at least 1: the best epoch, the searcher's objective and the stop rule read the validation split, never the test set",
            )
        )
    if cfg.attack.fgsm_step is not None:
        checks.append(("attack.fgsm_step", 0 < cfg.attack.fgsm_step <= 1, "must be in (0, 1]"))
    if cfg.dataset.train_size is not None:
        checks.append(("dataset.train_size", cfg.dataset.train_size >= 2, "must be at least 2"))
    if cfg.final_eval.n is not None:
        checks.append(("final_eval.n", cfg.final_eval.n >= 1, "must be at least 1"))
    if cfg.threads is not None:
        checks.append(("threads", cfg.threads >= 1, "must be at least 1"))
    checks.append(("dataset.pool", cfg.dataset.pool >= 1, "must be at least 1"))
    if cfg.dataset.crop_pad is not None:
        checks.append(("dataset.crop_pad", cfg.dataset.crop_pad >= 0, "must be non-negative"))
    for key, ok, problem in checks:
        if not ok:
            raise SpecError(key, f"{problem}; got {_get(cfg, key)!r}")
    _check_reach(cfg)
    for i, m in enumerate(cfg.schedule.milestones):
        if m <= 0:
            raise SpecError(f"schedule.milestones[{i}]", f"must be positive; got {m!r}")


def can_reach(*, steps: int, step: float, eps: float) -> bool:
    """Whether `steps` PGD steps of `step` can walk from x to the edge of a ball of radius `eps`."""
    return steps * step >= eps * (1 - 1e-9)


def _check_reach(cfg: TrialConfig) -> None:
    """PGD must be able to walk from x to the edge of its ball (:func:`can_reach`), for the
    training attack and the evaluation attack (which takes `attack.step`). Without this an L2 run
    that kept the L-inf step (2/255 against eps 0.5) would train and evaluate with an attack that
    never leaves the middle of its ball."""
    a = cfg.attack
    assert a.step is not None  # resolved by AttackConfig
    for key, steps in (("attack.steps", a.steps), ("eval_attack.steps", cfg.eval_attack.steps)):
        if not can_reach(steps=steps, step=a.step, eps=a.eps):
            raise SpecError(
                "attack.step",
                f"{a.step:.6g} x {key} {steps} = {steps * a.step:.6g} cannot reach eps {a.eps:.6g} ({a.norm}); "
                f"raise it to at least {a.eps / steps:.6g}, or leave it out for 2.5 * eps / steps",
            )


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_value(spec: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` to an already-typed `value` in place, creating mappings on the way."""
    node = spec
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part in ("schedule", "dataset"):
            child = {"name": child}  # `schedule: cosine` then `--set schedule.milestones=...`
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise SpecError(".".join(parts[: i + 1]), f"is {child!r}, not a mapping; cannot set {key}")
        node[part] = child
        node = child
    node[parts[-1]] = value


def trial_spec(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A study trial's spec: the study's `base` spec with the searcher's flat `params`
    ({"weat.power": 1.5}) set into a deep copy."""
    spec = copy.deepcopy(dict(base))
    for key, value in params.items():
        set_value(spec, key, value)
    return spec
