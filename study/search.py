"""Ray Tune's searchers over a study's Optuna study: what Tune's OptunaSearch and
ConcurrencyLimiter do, plus what a study that is resumed, retried and never trains a
configuration twice needs of them.

- :class:`StudySearch`: OptunaSearch that refuses duplicate configurations, keeps the Tune trial
  id on each Optuna trial, gives a retried trial a second Optuna trial, reopens the journal on
  the resuming machine, and uploads a study's journal on object storage before each save.
- :class:`StudyLimiter`: ConcurrencyLimiter that adopts trials it did not suggest.
- :func:`build_sampler`: the study's Optuna sampler (`sampler:`, checked by :mod:`study.sampler`),
  with the two of Optuna's samplers that Ray Tune's pickling and ask-and-tell need changed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.samplers import GridSampler, NSGAIISampler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from study.callbacks import JournalUpload
from study.journal import DUPLICATE_ATTR, LOST_ATTR, RETRY_ATTR, TUNE_ID_ATTR, journal_storage, outcome_attrs
from study.layout import journal_file
from study.sampler import SAMPLERS, SamplerKeys, check_sampler_for
from study.space import Dimension

DUPLICATE_ASKS = 20  # suggestions in a row that repeat a configuration before the space counts as exhausted


class StudySearch(OptunaSearch):
    """Tune's OptunaSearch which, for a study on object storage, uploads the journal before each
    save of its state.

    Tune pickles the searcher (the Optuna study, its trials' numbers) into the experiment
    checkpoint, and a resume elsewhere restores that state against the journal downloaded from the
    study. Trials are created and epochs reported between two :class:`JournalUpload` uploads, so
    a checkpoint taken in between would refer to records the uploaded journal lacks. Uploading
    here, before the state that refers to them, keeps the study's journal at least as new as its
    checkpoint. A failed upload warns, as JournalUpload's do: the study goes on.
    """

    def __init__(self, *, upload: JournalUpload | None, study_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upload = upload
        self.study_dir = study_dir

    def restore(self, checkpoint_path: str) -> None:
        """OptunaSearch's restore, then the Optuna study reopened on this machine's journal.

        The saved state holds the journal storage of the driver that saved it, its file path
        included: on another machine (another ENERGYAT_JOURNAL_DIR, another home) that path is
        not where this driver keeps the journal (:func:`study.layout.journal_file`, from local settings)."""
        super().restore(checkpoint_path)
        study_dir = getattr(self, "study_dir", None)
        if study_dir is None:  # a searcher pickled without study_dir: its saved storage is the journal to use
            return
        storage = journal_storage(journal_file(study_dir, self._study_name))
        self._storage = storage
        study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._study().sampler)
        # OptunaSearch declares the attribute None until set up
        self._ot_study = study  # type: ignore[assignment]
        self._ot_trials = {tid: optuna.Trial(study, t._trial_id) for tid, t in self._ot_trials.items()}

    def _study(self) -> Any:
        """The Optuna study (an optuna.Study; OptunaSearch declares the attribute None until set up)."""
        if self._ot_study is None:
            raise RuntimeError("StudySearch used before Tune set it up")
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | None:
        """OptunaSearch's suggestion, never a configuration already run, with the Tune trial id
        kept on the Optuna trial (user attribute `tune_trial_id`: after a killed driver,
        :func:`reconcile_lost_trials` tells from it which Optuna trials Tune never recorded).

        A suggestion equal to an earlier trial's parameters (a `sat` trial searches `method`
        only, so every one is the same configuration with the same seed, and trains to the same
        numbers) is not trained again. Following Optuna's own advice for duplicates, its Optuna
        trial is told the earlier trial's values (FAIL while that one still runs), marked
        `energyat_duplicate_of`, and the sampler is asked again. When DUPLICATE_ASKS asks in a
        row give nothing new, the space is taken as exhausted and the study ends early."""
        for _ask in range(DUPLICATE_ASKS):
            params = super().suggest(trial_id)
            trial = self._ot_trials[trial_id]
            twin = self._twin(trial)
            if twin is None:
                if trial.user_attrs.get(TUNE_ID_ATTR) != trial_id:
                    trial.set_user_attr(TUNE_ID_ATTR, trial_id)
                return params
            del self._ot_trials[trial_id]
            trial.set_user_attr(DUPLICATE_ATTR, twin.number)
            if twin.state == optuna.trial.TrialState.COMPLETE:
                self._study().tell(trial, twin.values)
            else:
                self._study().tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"energyat: {DUPLICATE_ASKS} suggestions in a row repeated configurations already run: the search space "
              "looks exhausted, so the study ends here (raise `samples` only with a larger `search`)", file=sys.stderr, flush=True)
        # how Tune's searchers end a study (the annotation OptunaSearch declares lacks it)
        return Searcher.FINISHED  # type: ignore[return-value]

    def _twin(self, trial: Any) -> Any:
        """An earlier trial (COMPLETE or RUNNING, not lost, not itself a duplicate) with `trial`'s parameters."""
        alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        for other in self._study().get_trials(deepcopy=False, states=alive):
            if (other.number != trial.number and other.params == trial.params
                    and LOST_ATTR not in other.user_attrs and DUPLICATE_ATTR not in other.user_attrs):
                return other
        return None

    def save(self, checkpoint_path: str) -> None:
        if self.upload is not None:
            self.upload.send()
        super().save(checkpoint_path)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._second_life(trial_id, result)
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._second_life(trial_id, result)
        if trial_id not in self._ot_trials:  # a retried trial that failed before its first result
            print(f"energyat: warning: trial {trial_id} failed before its first result; Optuna has no trial for it",
                  file=sys.stderr, flush=True)
            return
        trial = self._ot_trials[trial_id]
        # before the value: a dashboard watching the study sees both at once. A trial the journal
        # already has finished (its end reached the journal before a killed driver's last
        # searcher checkpoint) got them then; Optuna refuses to update it
        running = self._study()._storage.get_trial(trial._trial_id).state == optuna.trial.TrialState.RUNNING
        if result and running:
            for key, value in outcome_attrs(result).items():
                trial.set_user_attr(key, value)
        super().on_trial_complete(trial_id, result, error)

    def _second_life(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        """A trial Ray Tune runs again after it ended as ERROR (`resume --retry-errored`) gets a
        new Optuna trial with the same parameters (user attribute `energyat_retry_of`: the failed
        trial's number), which its results then go to. OptunaSearch alone would drop them, or fail:
        Tune restarts such a trial under a new id, which the searcher never suggested.

        Also re-attaches a trial the searcher's saved state predates (Tune saves it every few
        seconds; the journal, written at once, knows the trial by its Tune id, see `suggest`)."""
        if trial_id in self._ot_trials:
            return
        study = self._study()
        trials = study.get_trials(deepcopy=False)
        mine = [t for t in trials if t.user_attrs.get(TUNE_ID_ATTR) == trial_id]
        if mine:
            if mine[-1].state == optuna.trial.TrialState.RUNNING:
                self._ot_trials[trial_id] = optuna.Trial(study, mine[-1]._trial_id)
            return
        # Tune's restart: the failed trial is the one with these parameters no retry has taken yet
        params = {k.removeprefix("config/"): v for k, v in (result or {}).items() if k.startswith("config/")}
        taken = {t.user_attrs.get(RETRY_ATTR) for t in trials}
        failed = next((t for t in trials if t.state == optuna.trial.TrialState.FAIL and LOST_ATTR not in t.user_attrs
                       and DUPLICATE_ATTR not in t.user_attrs and t.number not in taken and params and t.params == params), None)
        if failed is None:
            return
        study.enqueue_trial(failed.params, user_attrs={TUNE_ID_ATTR: trial_id, RETRY_ATTR: failed.number}, skip_if_exists=False)
        self._ot_trials[trial_id] = study.ask(fixed_distributions=failed.distributions)


class StudyLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, which also counts and completes the trials it did not suggest.

    Tune restarts a trial under a new id (`resume --retry-errored`), and restores trials its
    saved limiter state may predate. ConcurrencyLimiter drops the completion of a trial it does
    not know, so its Optuna trial would stay RUNNING for ever, and does not count it against
    `max_concurrent`. Such a trial is adopted at its first result or completion.
    """

    def _adopt(self, trial_id: str) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._adopt(trial_id)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._adopt(trial_id)
        super().on_trial_complete(trial_id, result, error)



class PicklableNSGAII(NSGAIISampler):
    """Optuna's NSGAIISampler, which pickles: Optuna 5.1's holds a threading.Lock, so Ray Tune
    could not save a study that uses it (`TypeError: cannot pickle '_thread.lock'`). The lock
    is left out of the pickle and made anew when unpickled."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class StudyGrid(GridSampler):
    """Optuna's GridSampler for a study that asks and tells, as Ray Tune's searcher does.

    GridSampler ends a study by calling ``study.stop()`` once its last point is told, which
    Optuna allows only inside ``study.optimize``: under Ray Tune it raises in the middle of the
    trial's completion. An energyat study ends its own way, after `samples` trials or when every
    suggestion repeats a configuration already run (study.search.StudySearch)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


# Optuna's own classes, but for the two that Ray Tune's ask-and-tell and its pickled experiment
# state need changed (above)
_CLASSES: dict[str, type] = {"nsga2": PicklableNSGAII, "grid": StudyGrid}


def _sampler_class(name: str) -> Any:
    return _CLASSES.get(name) or getattr(optuna.samplers, SAMPLERS[name])


def grid_of(dims: Sequence[Dimension]) -> dict[str, list[Any]]:
    """The grid of a `search:` block of choices: every combination is one point."""
    return {d.key: list(d.choices) for d in dims}


def build_sampler(keys: SamplerKeys, *, objectives: int, seed: int, dims: Sequence[Dimension] = ()) -> Any:
    """Optuna's sampler for the study, seeded (`sampler.seed`, else the spec's `seed`)."""
    check_sampler_for(keys, objectives=objectives, dims=dims)
    cls = _sampler_class(keys.resolved(objectives))
    seed = keys.seed if keys.seed is not None else seed
    if keys.name == "grid":
        return cls(grid_of(dims), seed=seed)
    return cls(seed=seed, **keys.options)
