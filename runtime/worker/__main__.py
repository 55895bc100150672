"""``python -m argosy.runtime.worker PLAN_FD STATUS_FD``: a tensor-parallel worker process
(started by :class:`argosy.runtime.worker.executor.MultiprocExecutor`, not by users)."""

import sys

from .executor import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1:])
