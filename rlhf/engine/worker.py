"""The engine process: loads the policy once, then serves the app's requests until Shutdown.

Two threads: a reader that receives requests (StopRun acts at once by setting the running run's
stop flag; everything else is queued) and the main thread, which loads the model and handles the
queue: labeling pairs, reward training, PPO. Errors in a request become Error events and the engine
keeps serving; running out of memory is fatal (the state of the model is then unknown).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import traceback
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..config import Config, Workspace
from ..demo_mode import is_demo, use_demo_threads
from ..errors import RlhfError
from ..hooks import RunHooks, RunResult
from ..models import load_causal_lm, load_tokenizer, pick_device, resolve_model_name, safetensors_adapter
from ..active import Judges, PairJudge, is_repeat_turn, least_sure, selection_provenance
from ..run_requests import RunRequest, run_request
from ..sampling import PairSampler, a_side_first, sampling_params
from ..store import Store
from . import protocol

ADAPTER_CONFIG = "adapter_config.json"
FATAL_ERRORS = (MemoryError, torch.OutOfMemoryError)


def serve(conn: Connection, workspace_root: str, config: Config) -> None:
    """Run the engine on this end of the pipe with the app's config; returns (the process exits) after Shutdown."""
    outbox = Outbox(conn)
    engine = Engine(Workspace(Path(workspace_root)), config, outbox)
    threading.Thread(target=engine.read_requests, args=(conn,), name="request-reader", daemon=True).start()
    code = engine.run()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: torch's can take seconds and nothing is left to flush


class Outbox:
    """Sends events from either thread (a Connection is not safe to share without a lock)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, event: protocol.Event) -> None:
        with self._lock:
            try:
                self._conn.send(event)
            except (BrokenPipeError, ConnectionResetError, OSError):
                os._exit(0)  # the app is gone


class Inbox:
    """Requests for the main thread. Regenerate and Shutdown jump the queue of prefetch work."""

    def __init__(self) -> None:
        self._urgent: deque[protocol.Request] = deque()
        self._normal: deque[protocol.Request] = deque()
        self._ready = threading.Condition()

    def put(self, request: protocol.Request) -> None:
        with self._ready:
            urgent = isinstance(request, (protocol.Regenerate, protocol.Shutdown))
            (self._urgent if urgent else self._normal).append(request)
            self._ready.notify()

    def put_next(self, request: protocol.Request) -> None:
        """Continue a split-up request before later ones (but after urgent ones)."""
        with self._ready:
            self._normal.appendleft(request)
            self._ready.notify()

    def get(self) -> protocol.Request:
        with self._ready:
            while not (self._urgent or self._normal):
                self._ready.wait()
            return (self._urgent or self._normal).popleft()

    def take(self, kinds: tuple[type, ...]) -> list[protocol.Request]:
        """Remove and return, without waiting, the queued requests of these types (urgent ones first): what a
        run's thread serves between its steps; the others wait for the main loop."""
        with self._ready:
            taken = [request for queue in (self._urgent, self._normal) for request in queue
                     if isinstance(request, kinds)]
            for queue in (self._urgent, self._normal):
                kept = [request for request in queue if not isinstance(request, kinds)]
                queue.clear()
                queue.extend(kept)
            return taken


class PipeHooks(RunHooks):
    """Forwards a training loop's callbacks to the app as protocol events."""

    writes_back_database = False  # the app does (`RlhfApp.ensure_database_on_disk`)

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox
        self.run_id: str | None = None
        self.last_checkpoint: str | None = None

    def on_start(self, run_id: str, kind: str, total_steps: int, start_step: int = 0) -> None:
        self.run_id = run_id
        self.outbox.send(protocol.RunStarted(run_id, kind, total_steps, start_step))

    def on_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        self.outbox.send(protocol.RunStep(run_id, step, dict(metrics)))

    def on_samples(self, run_id: str, step: int, samples: list[dict[str, Any]]) -> None:
        self.outbox.send(protocol.RunSamples(run_id, step, list(samples)))

    def on_checkpoint(self, run_id: str, step: int, path: str) -> None:
        self.last_checkpoint = path
        self.outbox.send(protocol.RunCheckpoint(run_id, step, path))

    def on_warning(self, run_id: str, message: str) -> None:
        self.outbox.send(protocol.Warning(message, run_id))


def find_policy_adapter(checkpoint: Path) -> Path | None:
    """The PEFT adapter folder inside a PPO checkpoint: the folder itself or its `policy/` subfolder
    (PEFT saves a non-default adapter name into a subfolder of that name)."""
    for candidate in (checkpoint, checkpoint / "policy"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def latest_policy_adapter(store: Store, workspace: Workspace, model_name: str) -> Path | None:
    """The policy adapter of the newest PPO run with a checkpoint trained on this base, or None."""
    for run in reversed(store.runs("ppo")):
        if not run.checkpoint or run.config.get("model", {}).get("name", "") != model_name:
            continue
        checkpoint = Path(run.checkpoint)
        adapter = find_policy_adapter(checkpoint if checkpoint.is_absolute() else workspace.root / checkpoint)
        if adapter is not None:
            return adapter
    return None


def prompt_display_text(prompt: dict[str, Any]) -> str:
    """What the person reads: the plain prompt, or every turn of a chat prompt."""
    if not prompt["messages"]:
        return prompt["text"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt["messages"])


@dataclass(frozen=True)
class PairSource:
    """The model a pair is sampled from, and its provenance: the labeling model (base, or base + the newest PPO
    policy `adapter`), or a PPO run's live policy after `run_step` steps (`run_checkpoint`: its latest
    checkpoint then)."""

    sampler: PairSampler
    adapter: str | None = None
    run_id: str | None = None
    run_step: int | None = None
    run_checkpoint: str | None = None
    judge: Judges | None = None  # scores the pair: the newest reward runs, or a PPO run's own reward (rlhf.active)


class Engine:
    def __init__(self, workspace: Workspace, config: Config, outbox: Outbox) -> None:
        self.workspace = workspace
        self.cfg = config  # the app's: labeling samples with it; each run request carries its own
        self.outbox = outbox
        self.inbox = Inbox()
        self._run_lock = threading.Lock()
        self._run_hooks: PipeHooks | None = None
        self.store: Store
        self.sampler: PairSampler
        self.model_name = ""
        self.adapter: Path | None = None
        self.judge: PairJudge
        self.pairs_served = 0  # this session's, for [label] repeat_every
        self.repeat_due = False  # a repeat's turn came while there was no decision to repeat
        self.repeats_served: set[int] = set()  # decisions served again this session (each only once)
        self._last_margins: list[float] = []  # each judge's margin (score a - b) on the latest pair made

    # -- reader thread ---------------------------------------------------------------------------

    def read_requests(self, conn: Connection) -> None:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the app closed the pipe or died: nobody is left to serve
            if isinstance(request, protocol.StopRun):
                self._stop_run(request)
                continue
            if isinstance(request, protocol.Ping):
                self.outbox.send(protocol.Pong())
                continue
            if isinstance(request, protocol.Shutdown):
                self._stop_run(protocol.StopRun())
            self.inbox.put(request)

    def _stop_run(self, request: protocol.StopRun) -> None:
        with self._run_lock:
            hooks = self._run_hooks
        if hooks is None or (request.run_id is not None and request.run_id != hooks.run_id):
            return
        if not request.hard:
            hooks.stop_requested.set()
            return
        if hooks.run_id is not None:
            message = "hard stop: steps after the last checkpoint were discarded"
            with Store(self.workspace.db_path) as store:  # this thread's own connection
                store.update_run(hooks.run_id, status="stopped", error=message)
            self.outbox.send(protocol.RunEnded(RunResult(hooks.run_id, "stopped", message, hooks.last_checkpoint)))
        os._exit(protocol.HARD_STOP_EXIT_CODE)

    # -- main thread -----------------------------------------------------------------------------

    def run(self) -> int:
        """Load, then serve until Shutdown; returns the process exit code."""
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - every failure here is reported, then fatal
            self._report(exc, request=None, fatal=True)
            return 1
        while True:
            request = self.inbox.get()
            if isinstance(request, protocol.Shutdown):
                return 0
            try:
                self._handle(request)
            except FATAL_ERRORS as exc:
                self._report(exc, request=type(request).__name__, fatal=True)
                return 1
            except Exception as exc:  # noqa: BLE001 - a failed request must not end the engine
                self._report(exc, request=type(request).__name__, fatal=False)

    def _report(self, exc: BaseException, *, request: str | None, fatal: bool) -> None:
        if isinstance(exc, RlhfError):
            message = str(exc)
        else:
            traceback.print_exc()
            first_line = (str(exc).strip().splitlines() or [""])[0]
            message = f"{type(exc).__name__}: {first_line} (details in {self.workspace.root / 'engine.log'})"
        self.outbox.send(protocol.Error(message, fatal=fatal or isinstance(exc, FATAL_ERRORS), request=request))

    def _load(self) -> None:
        use_demo_threads(self.cfg)
        self.store = Store(self.workspace.db_path)
        self.model_name = resolve_model_name(self.cfg)
        self.outbox.send(protocol.Status("loading", f"loading tokenizer of {self.model_name}…", 0.2))
        tokenizer = load_tokenizer(self.model_name, trust_remote_code=self.cfg.model.trust_remote_code,
                                   padding_side="left")
        self.outbox.send(protocol.Status("loading", f"loading model {self.model_name}…", 0.4))
        self.sampler = PairSampler(self._load_base(), tokenizer, self.cfg.sampling, self.cfg.model.max_prompt_tokens)
        committee = self.cfg.label.uncertainty_runs if self.cfg.label.selection == "uncertain" else 1
        self.judge = PairJudge(self.workspace, self.cfg, tokenizer, self.model_name, committee)
        self._use_latest_policy()

    def _load_base(self) -> Any:
        return load_causal_lm(self.model_name, self.cfg.model.quantization,
                              trust_remote_code=self.cfg.model.trust_remote_code, device=pick_device()).eval()

    def _free_labeling_model(self) -> bool:
        """Give a training run the labeling model's memory (on a GPU, a second copy of the base, as runs load
        their own) when [model] free_during_runs says so: no pair is sampled while a run trains anyway."""
        setting = self.cfg.model.free_during_runs
        if setting == "never" or (setting == "auto" and not next(self.sampler.model.parameters()).is_cuda):
            return False
        self.outbox.send(protocol.Status("loading", "freeing the labeling model for the run…", None))
        self.sampler.model, self.adapter = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def _use_latest_policy(self) -> None:
        """Sample from base + the newest PPO policy adapter when there is one, then announce Ready."""
        # The resolved name, as run_ppo records it: on the demo model [model] name is empty.
        adapter = latest_policy_adapter(self.store, self.workspace, self.model_name)
        if adapter != self.adapter:
            self.outbox.send(protocol.Status("loading", f"loading policy adapter {adapter}…", 0.8))
            model = self.sampler.model
            base = model.unload() if isinstance(model, PeftModel) else model
            self.sampler.model = (PeftModel.from_pretrained(base, safetensors_adapter(adapter)).eval() if adapter
                                  else base)
            self.adapter = adapter
        self.sampler.model = self.judge.attach(self.sampler.model, self.store)
        for problem in self.judge.problems:
            self.outbox.send(protocol.Warning(problem))
        label = "demo" if is_demo(self.cfg) else Path(self.model_name).name or self.model_name
        self.outbox.send(protocol.Ready(model_label=label,
                                        adapter=str(self.adapter) if self.adapter else None,
                                        sampling=sampling_params(self.cfg.sampling)))

    def _handle(self, request: protocol.Request) -> None:
        if isinstance(request, (protocol.NeedPairs, protocol.Regenerate)):
            rest = self.answer_pair_request(request, self.labeling_source())
            if rest is not None:
                self.inbox.put_next(rest)  # urgent requests may come first
        elif isinstance(request, protocol.Refit):
            raise RlhfError("refit retrains the reward model while a PPO run trains, and no PPO run is training: "
                            "train a reward model on the Reward model screen")
        elif isinstance(request, (protocol.StartReward, protocol.StartPPO)):
            self._run(request)
        elif isinstance(request, protocol.PrepareEval):
            self._prepare_eval(request)
        else:
            raise TypeError(f"unknown request {request!r}")

    def _prepare_eval(self, request: protocol.PrepareEval) -> None:
        """Sample a blind evaluation session on the loaded base: the labeling adapter is set aside meanwhile and
        the newest policy put back after; EvalReady names the stored session."""
        from ..evaluation import plan_eval, prepare_eval

        plan = plan_eval(self.store, self.workspace, run_id=request.run_id, checkpoint=request.checkpoint,
                         against=request.against, prompt_tag=request.prompt_tag, count=request.count,
                         seed=request.seed)
        if plan.model_name != self.model_name:
            raise RlhfError(f"{plan.candidate.label} was trained on {plan.model_name}, not on the loaded "
                            f"{self.model_name}: start the app with --model {plan.model_name}")
        model = self.sampler.model
        self.sampler.model, self.adapter = model.unload() if isinstance(model, PeftModel) else model, None
        try:
            session_id = prepare_eval(self.store, plan, self.sampler.model, self.sampler.tokenizer, self.cfg,
                                      progress=lambda done, total: self.outbox.send(protocol.Status(
                                          "eval", f"sampling evaluation pair {done}/{total}…", done / total)))
        finally:
            self._use_latest_policy()
        self.outbox.send(protocol.EvalReady(session_id, len(plan.prompts)))

    def _next_prompt(self, held: tuple[int, ...]) -> int:
        """The next prompt to label, claimed in the store so another app on this workspace is not served it
        too; `held` (the app's queued and shown prompts) keep their claims. With every prompt already
        held, repeats are allowed."""
        prompt_id = self.store.claim_next_prompt(self.cfg.sampling.seed, held)
        if prompt_id is None:
            raise RlhfError("no prompts to label: import some with `rlhf-tui prompts import FILE` "
                            "(or start the app with --prompts FILE)")
        return prompt_id

    def labeling_source(self) -> PairSource:
        return PairSource(self.sampler, str(self.adapter) if self.adapter else None, judge=self.judge)

    def answer_pair_request(self, request: protocol.NeedPairs | protocol.Regenerate,
                            source: PairSource) -> protocol.NeedPairs | None:
        """Send one pair from `source` for a Regenerate, or the first of a NeedPairs; returns what is left of a
        NeedPairs (or None), so that the caller decides when the rest comes."""
        if isinstance(request, protocol.Regenerate):
            self.outbox.send(self._make_pair(request.prompt_id, regenerated=True, source=source))
            return None
        if request.count <= 0:
            return None
        pair = self._next_pair(request.exclude_prompt_ids, source)
        self.outbox.send(pair)
        if request.count == 1:
            return None
        return protocol.NeedPairs(request.count - 1, (*request.exclude_prompt_ids, pair.prompt_id))

    def _next_pair(self, held: tuple[int, ...], source: PairSource) -> protocol.PairReady:
        """The next pair to serve ([label] settings): a repeat of a labeled pair on its turn (or as soon after it
        as there is a decision to repeat: prefetched pairs are made before the person labels the ones ahead of
        them), else the least sure of `candidates` fresh pairs with selection = uncertain (and a reward run to
        judge), else a fresh one."""
        label = self.cfg.label
        self.repeat_due = self.repeat_due or is_repeat_turn(self.pairs_served, label.repeat_every)
        self.pairs_served += 1
        repeated = self.store.repeat_candidate(self.cfg.sampling.seed + self.pairs_served, self.repeats_served) \
            if self.repeat_due else None
        if repeated is not None:
            self.repeat_due = False
            self.repeats_served.add(repeated["id"])
            return self._repeat_pair(repeated)
        if label.selection != "uncertain" or source.judge is None or not source.judge.judges:
            return self._make_pair(self._next_prompt(held), regenerated=False, source=source)
        candidates: list[protocol.PairReady] = []
        margins: list[list[float]] = []
        for _ in range(label.candidates):
            prompt_id = self._next_prompt((*held, *(pair.prompt_id for pair in candidates)))
            candidates.append(self._make_pair(prompt_id, regenerated=False, source=source,
                                              selection=selection_provenance(self.cfg, source.judge.run_ids)))
            margins.append(self._last_margins)
        return candidates[least_sure(margins)]

    def _repeat_pair(self, repeated: dict[str, Any]) -> protocol.PairReady:
        """A labeled pair shown again with its sides swapped, pointing at the decision it repeats."""
        views = [protocol.ResponseView(repeated[f"response_{side}_id"], repeated[f"text_{side}"],
                                       repeated[f"tokens_{side}"] or 0) for side in ("b", "a")]
        return protocol.PairReady(prompt_id=repeated["prompt_id"],
                                  prompt_text=prompt_display_text(self.store.prompt(repeated["prompt_id"])),
                                  a=views[0], b=views[1], repeat_of=repeated["id"])

    def _make_pair(self, prompt_id: int, *, regenerated: bool, source: PairSource,
                   selection: dict[str, Any] | None = None) -> protocol.PairReady:
        """Sample two answers from `source` and store both (with provenance; `selection`: how the pair was
        chosen, kept in the sampling record) before they can be shown; scored by the source's judge if any."""
        prompt = self.store.prompt(prompt_id)
        with source.judge.sampling() if source.judge is not None else nullcontext():
            sampled = source.sampler.sample(prompt["text"], prompt["messages"], prompt_id=prompt_id,
                                            draw=self.store.response_count(prompt_id))
        provenance = {"model": self.model_name, "adapter": source.adapter,
                      "sampling": sampling_params(self.cfg.sampling) | (selection or {}), "seed": sampled.seed,
                      "prompt_tokens": sampled.prompt_tokens, "run_id": source.run_id,
                      "run_step": source.run_step, "run_checkpoint": source.run_checkpoint}
        with self.store.transaction():
            ids = [self.store.add_response(prompt_id, answer.text, response_tokens=answer.tokens,
                                           finished=answer.finished, **provenance)
                   for answer in sampled.answers]
        views = [protocol.ResponseView(i, answer.text, answer.tokens) for i, answer in zip(ids, sampled.answers)]
        if not a_side_first(self.cfg.sampling.seed, prompt_id, ids[0], ids[1]):
            views.reverse()
        verdict = self._judge_pair(source, prompt, [view.id for view in views], [view.text for view in views])
        return protocol.PairReady(prompt_id=prompt_id, prompt_text=prompt_display_text(prompt), a=views[0],
                                  b=views[1], notice="; ".join(sampled.notices) or None, regenerated=regenerated,
                                  run_id=source.run_id, run_step=source.run_step, **verdict)

    def _judge_pair(self, source: PairSource, prompt: dict[str, Any], ids: list[int],
                    texts: list[str]) -> dict[str, Any]:
        """Score a served pair (sides a, b) with the source's judge and store the scores, so the decision on it
        records whether the reward model agrees; the PairReady fields (none without a finished reward run)."""
        if source.judge is None or not source.judge.judges:
            return {}
        committee = source.judge.score(prompt["text"], prompt["messages"], texts)
        for run_id, scores in reversed(list(zip(source.judge.run_ids, committee))):  # the newest stored last
            self.store.add_response_scores(run_id, dict(zip(ids, scores)))
        self._last_margins = [a - b for a, b in committee]
        return {"reward_run": source.judge.run_ids[0], "reward_scores": tuple(committee[0])}

    def _run(self, request: RunRequest) -> None:
        """Run a reward or PPO request with hooks the reader thread can stop; report how it ended, then sample
        from the newest policy (a PPO run leaves one), loading the labeling model again if it was freed."""
        from .during_run import DuringRunHooks

        hooks = DuringRunHooks(self)
        freed = self._free_labeling_model()
        try:
            with self._run_lock:
                self._run_hooks = hooks
            try:
                result = run_request(self.workspace, request, hooks, self.store)
            finally:
                with self._run_lock:
                    self._run_hooks = None
            self.outbox.send(protocol.RunEnded(result))
        finally:
            if freed:
                self.outbox.send(protocol.Status("loading", f"loading model {self.model_name} again…", 0.4))
                self.sampler.model = self._load_base()
            self._use_latest_policy()
