"""torchrun for `shortcut train train.nproc=N`: torch's launcher, minus the tracebacks when a process fails or a
stop signal arrives.

A failing training process has already printed its one-line reason; torchrun would add a ChildFailedError
traceback. On SIGTERM/SIGINT torchrun passes the signal to every training process (they stop after the same step,
rank 0 checkpoints: shortcut.stop) and waits for them; this wrapper then exits 128 + the signal, without the
SignalException traceback and the shutdown warnings. Run as `python -m shortcut.launch <torchrun arguments>`.
"""

import logging
import os
import signal
import sys

from shortcut import stop

# How long torchrun waits for its processes to finish their step and write the checkpoint before SIGKILL (its own
# default, 30 s, is shorter than a large model's checkpoint can take).
SHUTDOWN_TIMEOUT_S = "120"


def _one_death_signal() -> None:
    """torchrun turns a death signal into an exception that starts the shutdown; a second one (the same signal
    sent to every process of a job, as SLURM can, and passed on by `shortcut train`) would cut that shutdown short
    and leave the training processes behind. The first one counts; the rest are ignored."""
    from torch.distributed.elastic.multiprocessing import api

    first = api._terminate_process_handler
    seen = []

    def once(signum, frame):
        if seen:
            return
        seen.append(signum)
        logging.disable(logging.WARNING)  # "Received SIGTERM death signal, shutting down workers", one per process
        first(signum, frame)

    api._terminate_process_handler = once  # looked up when torchrun installs its handlers


def _submitit_signals() -> None:
    """Under Submitit its preemption signal is the death signal, and SIGTERM only its warning (shortcut.stop)."""
    extra = stop.submitit_signal()
    if extra is None:
        return
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = f"SIGINT,SIGHUP,SIGQUIT,{extra.name}"
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a Python handler: not inherited as "ignore"


def main() -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    _one_death_signal()
    _submitit_signals()
    try:
        run(get_args_parser().parse_args())
    except SignalException as exc:  # the training processes have stopped (rank 0 said where it checkpointed)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        failures = exc.failures
        codes = sorted({f.exitcode for f in failures.values()})
        stopped = {128 + s for s in stop.watched()}
        if len(codes) == 1 and codes[0] in stopped:  # stopped by a signal sent to them directly: already said
            return codes[0]
        print(f"shortcut: {len(failures)} training process(es) failed (exit status {codes})", file=sys.stderr)
        return max(codes) if codes and max(codes) > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
