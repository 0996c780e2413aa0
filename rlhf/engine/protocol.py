"""Messages between the app and the engine process: small dataclasses pickled over a multiprocessing Pipe.

Requests go app -> engine, events engine -> app. Both sides only ever exchange these records (the run
requests StartReward and StartPPO are `rlhf.run_requests`'s, re-exported here), and this module imports
nothing heavy, so the UI process can use it without loading torch.

`Warning` and `Error` shadow Python's builtins inside this module on purpose (they are the event
names the other screens use): import the module and write `protocol.Warning`, not `from ... import`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The run requests are the core's own records (the CLI runs the same ones), re-exported for the app.
from ..run_requests import RunRequest, StartPPO, StartReward  # noqa: F401
from ..hooks import RunResult

# -- requests (app -> engine) -----------------------------------------------------------------


@dataclass(frozen=True)
class NeedPairs:
    """Generate `count` labeling pairs, skipping prompts the app already holds (queued or on screen)."""

    count: int
    exclude_prompt_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Regenerate:
    """Sample a fresh pair for this prompt (answered by a PairReady with regenerated=True)."""

    prompt_id: int


@dataclass(frozen=True)
class StopRun:
    """Stop a run. Graceful (default): it ends at the next step with a checkpoint. Hard: the engine
    process marks the run stopped and exits at once, losing the steps since the last checkpoint; the
    client starts a fresh engine."""

    run_id: str | None = None  # None = whatever run is in progress
    hard: bool = False


@dataclass(frozen=True)
class Shutdown:
    """Stop any run gracefully, then exit."""


@dataclass(frozen=True)
class Ping:
    """Answered at once by a Pong from the engine's request reader, whatever its main thread is doing: an
    engine that stops answering is stopped (SIGSTOP), frozen or swapping, not merely busy."""


@dataclass(frozen=True)
class Refit:
    """Train a reward model on every label so far, between two steps of the PPO run in progress (which pauses
    meanwhile), and switch that run to it at its next checkpoint; answered by RefitStatus events (an Error
    when no PPO run is training)."""


@dataclass(frozen=True)
class PrepareEval:
    """Sample a blind evaluation session: one answer from a PPO checkpoint and one from the opponent to each of
    `count` held-out prompts (the arguments of rlhf.evaluation.plan_eval; None = its default). Answered by
    Status events (stage "eval") while it samples, then EvalReady, or an Error (e.g. no held-out prompts)."""

    run_id: str | None = None
    checkpoint: int | None = None
    against: str = "reference"
    prompt_tag: str | None = None
    count: int = 20
    seed: int | None = None


Request = NeedPairs | Regenerate | RunRequest | StopRun | Shutdown | Ping | Refit | PrepareEval

# -- events (engine -> app) -------------------------------------------------------------------


STARTING = "starting"  # the Status stage sent first, and only, by a freshly started engine


@dataclass(frozen=True)
class Status:
    """What the engine is doing (stage: starting, loading...); progress in [0, 1] or None.

    A Status with stage STARTING means a new engine process: requests sent to an earlier one are lost.
    """

    stage: str
    message: str
    progress: float | None = None


@dataclass(frozen=True)
class Ready:
    """The model is loaded; pairs can be requested. `adapter` is the policy adapter path or None (base)."""

    model_label: str
    adapter: str | None
    sampling: dict[str, Any]


@dataclass(frozen=True)
class ResponseView:
    """One stored answer as shown: its `responses` row id, text and length in tokens."""

    id: int
    text: str
    tokens: int


@dataclass(frozen=True)
class PairReady:
    """Two stored answers to one prompt; `a` is the one to show on side A (already randomized)."""

    prompt_id: int
    prompt_text: str
    a: ResponseView
    b: ResponseView
    notice: str | None = None  # e.g. "prompt cut to its last 256 tokens", "answers identical after 3 re-samples"
    regenerated: bool = False
    run_id: str | None = None  # sampled between this PPO run's steps by its policy after `run_step` steps
    run_step: int | None = None
    reward_run: str | None = None  # the reward run that scored both answers as served (None: none finished)
    reward_scores: tuple[float, float] | None = None  # its standardised scores of a and b
    repeat_of: int | None = None  # a repeated pair (sides swapped): the comparison id it repeats


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    kind: str
    total_steps: int
    start_step: int = 0


@dataclass(frozen=True)
class RunStep:
    run_id: str
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunSamples:
    run_id: str
    step: int
    samples: list[dict[str, Any]]


@dataclass(frozen=True)
class RunCheckpoint:
    run_id: str
    step: int
    path: str


@dataclass(frozen=True)
class RunEnded:
    """A run is over: how it ended, as the training function returned it."""

    result: RunResult

    @property
    def run_id(self) -> str:
        """The run it is about, named where every run event names it."""
        return self.result.run_id


@dataclass(frozen=True)
class Warning:  # noqa: A001 - the protocol's name; see the module docstring
    message: str
    run_id: str | None = None  # the run it is about; None for the engine's own (e.g. labeling) warnings


@dataclass(frozen=True)
class Error:  # noqa: A001
    """A request failed. fatal: the engine is gone (or going) and must be restarted.

    `request` names the failed request's type (e.g. "NeedPairs"; test it with `is_about`), so the app can
    forget what it was waiting for; None when the failure is not tied to one request (a crash, a failed model
    load).
    """

    message: str
    fatal: bool = False
    request: str | None = None

    def is_about(self, *request_types: type) -> bool:
        """Whether this is the failure of a request of one of these types (e.g. `NeedPairs`)."""
        return self.request in {request_type.__name__ for request_type in request_types}


@dataclass(frozen=True)
class Pong:
    """The answer to a Ping (the client keeps it to itself)."""


@dataclass(frozen=True)
class Responding:
    """Made by the client, not the engine: the engine stopped answering pings (responding False, `message`
    says for how long), or answers again."""

    responding: bool
    message: str = ""


@dataclass(frozen=True)
class RefitStatus:
    """How a Refit goes: "training" (PPO paused), "ready" (trained: the run switches at its next checkpoint),
    "switched", or "failed" (the run keeps scoring with the reward run it had); `message` says it in words."""

    run_id: str  # the PPO run
    stage: str
    message: str
    reward_run: str | None = None  # the refit's reward run, once it has one


@dataclass(frozen=True)
class EvalReady:
    """A PrepareEval's session is stored (rlhf.store eval tables): `pairs` blind pairs to label."""

    session_id: str
    pairs: int


Event = (Status | Ready | PairReady | RunStarted | RunStep | RunSamples | RunCheckpoint | RunEnded | Warning
         | Error | Pong | Responding | RefitStatus | EvalReady)

# Exit code of an engine that ended itself on a hard StopRun: the client restarts it instead of
# reporting a crash.
HARD_STOP_EXIT_CODE = 3
