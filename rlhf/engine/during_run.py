"""What the engine does for the app while a run trains: labeling pairs and refits, between the run's steps.

The engine's main thread runs one training run at a time. The app keeps asking for pairs meanwhile, and the
run's hooks answer them after each step, in the run's own thread, before the next step starts:

- during a PPO run, two answers to one prompt from the run's current policy (its live model, the policy
  adapter active): what the person labels is what PPO is turning the model into, right now, with the run,
  step and latest checkpoint stored with each answer. No second copy of the model (it may not fit beside the
  run on a GPU) and no second thread: torch's random streams are global, and sampling beside the run would
  change what the run draws. Between steps, inside `preserved_rng`, a run with labeling draws exactly what it
  draws without. Each pair is judged by the reward that scores the run's steps then (its scores stored under that
  reward run, so a decision records whether the reward PPO optimises agrees with the person);
- during a reward run, from the labeling model when it is still loaded ([model] free_during_runs);
- a Refit request trains a reward model on every label so far (the PPO run waits) and the run switches to it at
  its next checkpoint (`rlhf.refit`).

The cost: the run's next step starts after the pairs asked for (at most [sampling] prefetch + 1 at a time).
"""

from __future__ import annotations

import sys
from typing import Any

from ..active import Judges, run_reward_judge
from ..hooks import RunHooks
from ..refit import current_reward_run, preserved_rng, train_refit
from ..runs import error_line
from ..sampling import PairSampler
from . import protocol
from .worker import FATAL_ERRORS, Engine, PairSource, PipeHooks

PAIR_REQUESTS = (protocol.NeedPairs, protocol.Regenerate)


def log(message: str) -> None:
    """A line in the workspace's engine.log (the engine's stderr): refits are recorded there too."""
    print(f"refit: {message}", file=sys.stderr, flush=True)


class DuringRunHooks(PipeHooks):
    """The engine's hooks for a run: forward progress to the app (PipeHooks), and after each step serve the pair
    and refit requests that came in meanwhile."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.outbox)
        self.engine = engine
        self.kind = ""
        self.policy: PairSampler | None = None  # a PPO run's live policy, once it is built
        self.run_judge: Judges | None = None  # the reward scoring the PPO run's steps, judging its pairs
        self.refit_reward: str | None = None  # a finished refit the PPO run switches to at its next checkpoint

    def on_start(self, run_id: str, kind: str, total_steps: int, start_step: int = 0) -> None:
        self.kind = kind
        super().on_start(run_id, kind, total_steps, start_step)

    def on_policy(self, run_id: str, model: Any, tokenizer: Any) -> None:
        cfg = self.engine.cfg
        self.policy = PairSampler(model, tokenizer, cfg.sampling, cfg.model.max_prompt_tokens)

    def on_reward(self, run_id: str, reward_run: str, reward: Any) -> None:
        self.run_judge = run_reward_judge(self.engine.workspace, reward_run, reward, self.policy.tokenizer)

    def on_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        super().on_step(run_id, step, metrics)
        with preserved_rng():
            self._serve_pairs(run_id, step)
            for _ in self.engine.inbox.take((protocol.Refit,)):
                self._refit(run_id, step)

    def take_reward_switch(self, run_id: str, step: int) -> str | None:
        reward_run, self.refit_reward = self.refit_reward, None
        return reward_run

    def on_reward_switch(self, run_id: str, step: int, reward_run: str, error: str | None) -> None:
        if error is None:
            self._refit_status(run_id, "switched", f"PPO scores with reward run {reward_run} from step {step + 1}",
                               reward_run)
        else:
            self._refit_status(run_id, "failed", error, reward_run)

    # -- pairs -----------------------------------------------------------------------------------

    def _pair_source(self, run_id: str, step: int) -> PairSource | None:
        if self.policy is not None:
            return PairSource(self.policy, run_id=run_id, run_step=step, run_checkpoint=self.last_checkpoint,
                              judge=self.run_judge)
        if self.kind == "reward" and self.engine.sampler.model is not None:
            return self.engine.labeling_source()
        return None  # the labeling model was freed for this run: pairs wait for its end

    def _serve_pairs(self, run_id: str, step: int) -> None:
        source = self._pair_source(run_id, step)
        if source is None:
            return
        for request in self.engine.inbox.take(PAIR_REQUESTS):
            try:
                while request is not None:
                    request = self.engine.answer_pair_request(request, source)
            except FATAL_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed pair must not fail the run
                self.engine._report(exc, request=type(request).__name__, fatal=False)

    # -- refit -----------------------------------------------------------------------------------

    def _refit_status(self, run_id: str, stage: str, message: str, reward_run: str | None = None) -> None:
        log(f"{run_id}: {stage}: {message}")
        self.outbox.send(protocol.RefitStatus(run_id, stage, message, reward_run))
        if stage == "failed":
            self.outbox.send(protocol.Warning(f"refit failed: {message}", run_id))

    def _refit(self, run_id: str, step: int) -> None:
        """Train the refit now (the run waits); a finished one is switched to at the run's next checkpoint."""
        if self.kind != "ppo":
            self._refit_status(run_id, "failed", "refit retrains the reward model during a PPO run; this is a "
                                                 f"{self.kind} run")
            return
        store = self.engine.store
        current = current_reward_run(store, run_id, step)
        labels = store.stats()["comparisons"]
        self._refit_status(run_id, "training", f"training a reward model on {labels} labels after step {step} "
                                               "(PPO waits)")
        try:
            result = train_refit(self.engine.workspace, store, current, self.engine.cfg, RefitHooks(self, run_id))
        except Exception as exc:  # noqa: BLE001 - out of memory included: the refit's tensors go, the run's stay
            self._refit_status(run_id, "failed", f"{error_line(exc)}; PPO keeps scoring with reward run {current}")
            return
        if result.status != "finished":
            self._refit_status(run_id, "failed", f"the refit {result.run_id} {result.status} ({result.message}); PPO "
                                                 f"keeps scoring with reward run {current}", result.run_id)
            return
        self.refit_reward = result.run_id
        self._refit_status(run_id, "ready", f"reward run {result.run_id} trained on {labels} labels: PPO switches to "
                                            f"it at its next checkpoint (now scoring with {current})", result.run_id)


class RefitHooks(RunHooks):
    """A refit's hooks: its progress goes to the app as RefitStatus events (not as a run of its own: the screens
    follow the PPO run), and stopping the PPO run stops the refit first."""

    writes_back_database = False  # the app does (`RlhfApp.ensure_database_on_disk`)

    def __init__(self, ppo_hooks: DuringRunHooks, ppo_run: str) -> None:
        super().__init__()
        self.stop_requested = ppo_hooks.stop_requested
        self.ppo_hooks, self.ppo_run, self.total_steps = ppo_hooks, ppo_run, 0

    def on_start(self, run_id: str, kind: str, total_steps: int, start_step: int = 0) -> None:
        self.total_steps = total_steps

    def on_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        self.ppo_hooks.outbox.send(protocol.RefitStatus(
            self.ppo_run, "training", f"refit {run_id}: step {step}/{self.total_steps} (PPO waits)", run_id))
