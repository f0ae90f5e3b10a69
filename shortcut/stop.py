"""Graceful stop on a signal: training ends after the current step with a checkpoint, one line and exit status
128 + the signal (STYLE.md "Signals are part of the contract", as torchtitan, Lightning and Submitit do; issue 19).

The handlers only note the signal. The training loop asks `Watch.due()` after every step; the processes of a
data-parallel run agree on the answer with one tiny all_reduce, so all of them stop after the same step. What a
signal does:

- SIGTERM (what SLURM and most schedulers send) and SIGINT (Ctrl-C): checkpoint and stop. A second SIGINT stops at
  once (the last checkpoint written stays the one to resume from).
- a signal for which another Python handler was installed before ours (Submitit's, in the job process it starts):
  checkpoint, then call that handler. Submitit's USR2 handler resubmits the job and exits; the resubmitted job runs
  the same command, which resumes from the checkpoint. Its SIGTERM handler only logs: training goes on.
- under Submitit (SUBMITIT_FOLDER is set: its job and the processes the job starts), SIGTERM is its warning that
  the preemption signal (SUBMITIT_PREEMPT_SIGNAL, USR2 by default) follows, so it only asks for a checkpoint; the
  preemption signal stops the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

STOP, CHECKPOINT, CHAIN = "stop", "checkpoint", "chain"


class Stopped(SystemExit):
    """Training ended by a signal after its one line was said; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, immediate: bool = False):
        super().__init__(128 + int(signum))
        self.signum, self.immediate = int(signum), immediate


def under_submitit() -> bool:
    return "SUBMITIT_FOLDER" in os.environ  # set by Submitit's job process; its children inherit it


def submitit_signal() -> signal.Signals | None:
    """Submitit's preemption / time-limit signal, when running under Submitit."""
    if not under_submitit():
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def watched() -> list[signal.Signals]:
    extra = submitit_signal()
    return [signal.SIGTERM, signal.SIGINT] + ([extra] if extra not in (None, signal.SIGTERM, signal.SIGINT) else [])


def name(signum: int) -> str:
    return signal.Signals(signum).name


def chained(previous) -> bool:
    """Whether a handler found installed is someone's Python code that wants to be told (not Python's Ctrl-C)."""
    return callable(previous) and previous is not signal.default_int_handler


def policy(signum: int, previous) -> str:
    if chained(previous):
        return CHAIN
    if signum == signal.SIGTERM and under_submitit():
        return CHECKPOINT
    return STOP


class Watch:
    """The signals noted since install(); the loop acts on them at step boundaries (due)."""

    def __init__(self):
        self.pending: list[int] = []
        self.previous: dict[int, object] = {}
        self.sigints = 0
        self.group = None  # a gloo group to agree in when the default one is NCCL (no device sync per step)

    def install(self) -> Watch:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in watched():
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _note(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints > 1 and policy(signum, self.previous.get(signum)) == STOP:
                raise Stopped(signum, immediate=True)  # Ctrl-C twice: the user will not wait for the step
        if signum not in self.pending:
            self.pending.append(signum)

    def join_group(self, world: int) -> None:
        """Every process calls this once after joining the process group."""
        import torch.distributed as dist

        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def due(self, world: int = 1) -> list[int]:
        """The signals any process noted since the last call, the same list on every process (one all_reduce of a
        few bytes when world > 1; every process calls it at the same point of every step, so it cannot deadlock)."""
        if world > 1:
            import torch
            import torch.distributed as dist

            mask = torch.zeros(signal.NSIG, dtype=torch.uint8)
            mask[self.pending] = 1
            dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.group)
            noted = mask.nonzero().flatten().tolist()
        else:
            noted = sorted(self.pending)
        self.pending = [s for s in self.pending if s not in noted]
        return noted

    def decide(self, signals: list[int]) -> tuple[str, int] | None:
        """(what to do, for which signal): a stop wins over a checkpoint request."""
        if not signals:
            return None
        kinds = {s: policy(s, self.previous.get(s)) for s in signals}
        for kind in (STOP, CHAIN, CHECKPOINT):
            for s in signals:
                if kinds[s] == kind:
                    return kind, s
        return None

    def hand_over(self, signum: int) -> None:
        """Run the handler that was installed before ours (Submitit's requeue); it may exit."""
        previous = self.previous.get(signum)
        if chained(previous):
            previous(signum, None)


def run_launcher(cmd: list[str], preexec_fn=None) -> int:
    """Run torch's launcher (python -m shortcut.launch ...) in a session of its own and wait for it: a stop signal
    reaches it once, from here (a signal to this process's group does not reach it twice), its processes stop after
    the same step, and this process exits only after them. A handler installed before (Submitit's) runs after the
    launcher ended. Raises Stopped when the run ended by a stop signal; else returns the launcher's exit status."""
    proc = subprocess.Popen(cmd, preexec_fn=preexec_fn, start_new_session=True)
    previous, forwarded, later = {}, [], []

    def forward(signum, frame):
        if signum == signal.SIGTERM and under_submitit():  # Submitit's warning: the workers go on training
            if chained(previous.get(signum)):
                previous[signum](signum, frame)
            return
        forwarded.append(signum)
        if chained(previous.get(signum)) and signum not in later:
            later.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in watched():
            previous[sig] = signal.signal(sig, forward)
    try:
        rc = proc.wait()
    except BaseException:
        proc.kill()  # PR_SET_PDEATHSIG covers a killed parent; this covers an exception here
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    for signum in later:
        previous[signum](signum, None)  # e.g. Submitit: resubmit the job, then exit
    stops = {128 + s: s for s in watched()}
    if rc in stops:  # the workers said their one line
        raise Stopped(stops[rc])
    return rc  # 0 also after a signal that came with the last step: the run finished
