"""torchrun for `shortcut train train.nproc=N`: torch's launcher, minus the traceback when a process fails.

A failing training process has already printed its one-line reason; torchrun would add a ChildFailedError
traceback. Run as `python -m shortcut.launch <torchrun arguments>`.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def main() -> int:
    try:
        run(get_args_parser().parse_args())
    except ChildFailedError as exc:
        failures = exc.failures
        codes = sorted({f.exitcode for f in failures.values()})
        print(f"shortcut: {len(failures)} training process(es) failed (exit status {codes})", file=sys.stderr)
        return max(codes) if codes and max(codes) > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
