"""The results tables, each declared once.

Writer (``trainables/engine.py`` through ``analysis/store.py``), reader (``analysis/query.py``)
and docs (the README's column list, checked by a test) all use these schemas. Each field's
``doc`` metadata says what the value means and what NaN means there.

Energies follow docs/science.md section 1: E(x) = -logsumexp f(x), E(x,y) = -f(x)[y], and the delta
energy dE(x) = E(x) - E(x*), x* the adversarial example.
"""

from __future__ import annotations

import pyarrow as pa

# 2: a validation split selects (best_val_* columns); the test set only reports (test_* curve,
#    final_*, the `evals` table). Version 1 selected on a test subset (best_test_robust_acc).
SCHEMA_VERSION = 2

_PROBED = "NaN on epochs without a probe (see probe.every)"


def _f(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, type_, metadata={"doc": doc})


EPOCHS = pa.schema(
    [
        _f("study", pa.string(), "study name (spec `name`)"),
        _f("trial_id", pa.string(), "trial id, unique in the study"),
        _f("epoch", pa.int32(), "0-based epoch"),
        _f("method", pa.string(), "AT method"),
        _f("lr", pa.float64(), "mean learning rate over the epoch's batches"),
        _f("train_loss", pa.float64(), "mean training loss over the epoch's batches; NaN or inf marks divergence"),
        _f("train_clean_acc", pa.float64(), "accuracy on the clean training batches (eval-mode BN for methods whose loss never sees x)"),
        _f("train_adv_acc", pa.float64(), "accuracy on the inputs the method trained on: x* for AT methods, x for standard"),
        _f("probe_train_E", pa.float64(), f"mean E(x) over the training probe; {_PROBED}"),
        _f("probe_train_E_adv", pa.float64(), f"mean E(x*) over the training probe, x* from the method's own attack; {_PROBED}"),
        _f("probe_train_dE", pa.float64(), f"mean dE(x) = E(x) - E(x*) over the training probe; {_PROBED}"),
        _f("probe_train_dE_abs_p50", pa.float64(), f"median of abs(dE(x)) over the training probe; {_PROBED}"),
        _f("probe_train_dE_abs_p90", pa.float64(), f"90th percentile of abs(dE(x)) over the training probe; {_PROBED}"),
        _f("probe_train_dEy", pa.float64(), f"mean dE(x,y) = E(x,y) - E(x*,y) over the training probe; {_PROBED}"),
        _f("probe_train_E_tgt", pa.float64(), f"mean E(x*) under targeted PGD to a random wrong class; {_PROBED}"),
        _f("probe_train_aae_frac", pa.float64(), f"fraction of abnormal adversarial examples, CE(x*,y) < CE(x,y); {_PROBED}"),
        _f("val_clean_acc", pa.float64(), f"clean accuracy on the validation split (dataset.val_size images held out of training); {_PROBED}"),
        _f("val_robust_acc", pa.float64(), f"accuracy under the eval PGD attack on the validation split: what selects the best epoch; {_PROBED}"),
        _f("val_robust_loss", pa.float64(), f"mean CE under the eval PGD attack on the validation split; {_PROBED}"),
        _f(
            "test_clean_acc",
            pa.float64(),
            f"clean accuracy on the fixed test subset (a curve for the figures: selects nothing); {_PROBED} or probe.test_size is 0",
        ),
        _f(
            "test_robust_acc",
            pa.float64(),
            f"accuracy under the eval PGD attack on the fixed test subset (selects nothing); {_PROBED} or probe.test_size is 0",
        ),
        _f("test_robust_loss", pa.float64(), f"mean CE under the eval PGD attack on the fixed test subset; {_PROBED} or probe.test_size is 0"),
        _f("probe_test_E", pa.float64(), f"mean E(x) over the test subset; {_PROBED} or probe.test_size is 0"),
        _f("probe_test_E_adv", pa.float64(), f"mean E(x*) over the test subset, x* from the eval PGD attack; {_PROBED} or probe.test_size is 0"),
        _f("probe_test_dE", pa.float64(), f"mean dE(x) over the test subset; {_PROBED} or probe.test_size is 0"),
        _f("weight_mean", pa.float64(), "mean per-sample loss weight (WEAT weights, DER's AAE gate; 1.0 when none)"),
        _f("weight_min", pa.float64(), "smallest per-sample loss weight of the epoch"),
        _f("weight_max", pa.float64(), "largest per-sample loss weight of the epoch"),
        _f("phase", pa.int8(), "online phase label (1, 2, 3) as the detector saw it this epoch"),
        _f("alarm", pa.bool_(), "the online detector's energy-divergence alarm (robust-overfitting onset)"),
        _f("alarm_reason", pa.string(), "why the alarm fired (|dE| growth, or non-finite probe energies), with its epoch; null without an alarm"),
        _f(
            "best_val_robust_acc",
            pa.float64(),
            "val_robust_acc at the best epoch so far, the epoch `select` picks (for an AT method the running best of "
            "val_robust_acc); what the searcher optimises; NaN before the first probe",
        ),
        _f("best_val_clean_acc", pa.float64(), "val_clean_acc at the best epoch so far; NaN before the first probe"),
        _f("probed", pa.bool_(), "whether the energy probe and test evaluation ran this epoch"),
        _f("epoch_seconds", pa.float64(), "wall seconds of the epoch's training pass"),
        _f("probe_seconds", pa.float64(), "wall seconds of the probe and test evaluation (0 when not probed)"),
        _f("images_per_second", pa.float64(), "training images per second of the training pass"),
    ]
)

SAMPLES = pa.schema(
    [
        _f("study", pa.string(), "study name"),
        _f("trial_id", pa.string(), "trial id"),
        _f("epoch", pa.int32(), "0-based epoch"),
        _f("split", pa.string(), "`train` (training probe, x* from the method's attack) or `test` (test subset, x* from eval PGD)"),
        _f("index", pa.int32(), "index of the image in its split of the dataset"),
        _f("label", pa.int32(), "true class y"),
        _f("E", pa.float32(), "E(x)"),
        _f("E_adv", pa.float32(), "E(x*)"),
        _f("Ey", pa.float32(), "E(x,y)"),
        _f("Ey_adv", pa.float32(), "E(x*,y)"),
        _f("E_tgt", pa.float32(), "E(x*) under targeted PGD to a random wrong class; NaN on the test split (not attacked)"),
        _f("correct", pa.bool_(), "prediction on x is y"),
        _f("correct_adv", pa.bool_(), "prediction on x* is y"),
    ]
)

# `trials`: these outcome columns, then every resolved config value as its own column
# (dotted keys joined with "_", e.g. weat.tau -> weat_tau, in declaration order; a config key
# that clashes with an outcome column gets the prefix `spec_`, e.g. spec_device).
TRIAL_OUTCOME = pa.schema(
    [
        _f("study", pa.string(), "study name"),
        _f("trial_id", pa.string(), "trial id"),
        _f("status", pa.string(), "RUNNING while training, TERMINATED when done, ERROR after a failure"),
        _f(
            "stop_reason",
            pa.string(),
            "completed, energy_divergence, val_patience, `scheduler: asha`, `scheduler: asha_energy`, `scheduler: median` "
            "or `error: ...`; null while running",
        ),
        _f("epochs_run", pa.int32(), "epochs completed"),
        _f("best_epoch", pa.int32(), "the epoch whose checkpoint is kept: the best of the selected_by metric; null before the first probe"),
        _f("selected_by", pa.string(), "the validation metric that picked best_epoch (`select`: val_robust_acc for AT methods, "
                                       "val_clean_acc for standard by default)"),
        _f("best_val_robust_acc", pa.float64(), "validation robust accuracy (eval PGD) at best_epoch; NaN before the first probe"),
        _f("best_val_clean_acc", pa.float64(), "validation clean accuracy at best_epoch; NaN before the first probe"),
        _f(
            "final_clean_acc",
            pa.float64(),
            "clean accuracy of the best checkpoint on the first final_eval.n test images (fp32); NaN until the final evaluation",
        ),
        _f(
            "final_pgd_acc",
            pa.float64(),
            "PGD-(final_eval.pgd_steps) accuracy of the best checkpoint on the same images (fp32); NaN until the final evaluation",
        ),
        _f(
            "final_autoattack_acc",
            pa.float64(),
            "original AutoAttack (standard) accuracy of the best checkpoint on the first final_eval.autoattack_n test images (fp32); "
            "NaN when skipped",
        ),
        _f("final_n", pa.int32(), "test images behind final_clean_acc and final_pgd_acc (the first n of the split); null until the final evaluation"),
        _f("final_autoattack_n", pa.int32(), "test images behind final_autoattack_acc; null when AutoAttack was skipped or has not run"),
        _f("final_seconds", pa.float64(), "wall seconds of the final evaluation (clean, PGD and AutoAttack on the test set); "
           "null until it has run (a trial written before this column: null)"),
        _f("phase2_start", pa.int32(), "first epoch of phase 2 (offline detector); null if not reached"),
        _f("phase3_start", pa.int32(), "detected robust-overfitting onset (offline detector); null if none"),
        _f("alarm_epoch", pa.int32(), "first epoch the online detector raised its alarm; null if never"),
        _f("seconds", pa.float64(), "wall seconds of the whole trial so far, final evaluation included"),
        _f("device", pa.string(), "device the trial ran on, e.g. cpu or cuda:0 (NVIDIA H100 ...)"),
        _f(
            "train_precision",
            pa.string(),
            "what training computed in: bf16 (autocast) or fp32 (`precision` resolved for the device); evaluations are always fp32",
        ),
        _f("git_sha", pa.string(), "energyat source revision, `unknown` outside a git checkout"),
    ]
)

# `evals`: one row per (model, attack, evaluation) on the test set, in fp32: every trial's final
# evaluation and every `energyat eval` (also of models energyat did not train: a state-dict file
# or a RobustBench model). tables/evals/trial=<name>/eval-<key>.parquet, <key> a digest of what
# defines the evaluation, so the same evaluation run again replaces its row.
EVALS = pa.schema(
    [
        _f("study", pa.string(), "study name of the trial; for a model from outside, the output directory's name"),
        _f("trial_id", pa.string(), "trial id, or the name of a model from outside (`--name`, default the file stem or RobustBench name)"),
        _f("source", pa.string(), "trial (an energyat checkpoint), checkpoint (a state-dict file) or robustbench"),
        _f(
            "checkpoint",
            pa.string(),
            "the weights evaluated: a file path, `best.pt (epoch N)` for a final evaluation, or robustbench:NAME/DATASET/THREAT",
        ),
        _f("method", pa.string(), "the trial's AT method; null for a model from outside"),
        _f("model", pa.string(), "architecture (energyat's registry name, or the RobustBench model name)"),
        _f("dataset", pa.string(), "dataset whose test split was evaluated"),
        _f("attack", pa.string(), "clean, pgd (untargeted, uniform random start) or autoattack (the original, standard version)"),
        _f("steps", pa.int32(), "PGD steps; null for clean and autoattack (whose attacks run their own 100 iterations)"),
        _f("norm", pa.string(), "threat model: linf or l2"),
        _f("eps", pa.float64(), "radius of the threat ball, input scale [0, 1]"),
        _f("n", pa.int32(), "test images evaluated: the first n of the test split, as RobustBench does"),
        _f("correct", pa.int32(), "images classified correctly (under the attack)"),
        _f("accuracy", pa.float64(), "correct / n"),
        _f("seed", pa.int64(), "seed of the attack's random starts (AutoAttack's `seed`)"),
        _f("evaluated_by", pa.string(), "final_eval (the trial's own, at the end of training) or `energyat eval`"),
        _f("evaluated_at", pa.string(), "UTC time the evaluation finished, ISO 8601"),
        _f("seconds", pa.float64(), "wall seconds of the pass that evaluated it (clean and pgd share one pass)"),
        _f("device", pa.string(), "device the evaluation ran on"),
        _f("git_sha", pa.string(), "energyat source revision"),
    ]
)

TABLES: dict[str, pa.Schema] = {"epochs": EPOCHS, "samples": SAMPLES, "trials": TRIAL_OUTCOME, "evals": EVALS}

# `energyat landscape` (trainables/landscape.py): DIR/landscape/landscape.parquet, one row per
# (trial, attack, test-probe sample), from each trial's best checkpoint. Not a study view: it is
# written on demand and replaced by the next `energyat landscape`.
LANDSCAPE = pa.schema(
    [
        _f("trial_id", pa.string(), "trial id"),
        _f("method", pa.string(), "AT method of the trial"),
        _f("attack", pa.string(), "pgd, targeted, trades or fgsm, with the trial's own threat model"),
        _f("index", pa.int64(), "position of the sample in the test split (the trial's test probe)"),
        _f("label", pa.int64(), "true class"),
        _f("dE", pa.float64(), "E(x) - E(x*): positive when the attack lowers the marginal energy"),
        _f("dEy", pa.float64(), "E(x,y) - E(x*,y)"),
        _f("fooled", pa.bool_(), "the model misclassifies x*"),
        _f("checkpoint", pa.string(), "the best checkpoint the rows come from"),
    ]
)


def config_column(key: str) -> str:
    """Column name of a dotted config key in `trials`."""
    name = key.replace(".", "_")
    return f"spec_{name}" if name in TRIAL_OUTCOME.names else name
