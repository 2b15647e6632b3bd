"""`python -m temper.launch.torchrun_agent ARGS`: torchrun (torch.distributed.run) with ARGS,
quiet about failures: the workers leave their root cause in TEMPER_ERROR_DIR and their
tracebacks in their rank logs, so torchrun's ChildFailedError report and its per-worker
error lines would only bury the cause. TEMPER_VERBOSE=1 keeps them.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if not os.environ.get("TEMPER_VERBOSE"):  # elastic's loggers each set their own level at import
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    try:
        torchrun(argv)
    except ChildFailedError:
        if os.environ.get("TEMPER_VERBOSE"):
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
