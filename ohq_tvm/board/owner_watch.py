"""Run a command and take its whole process group down when the process that started it dies.

:class:`~.processes.ProcessGroup` starts every tracker and server through this script, as
``python owner_watch.py COMMAND...`` leading a process group of its own, with the starting process's pid
in ``$OHQ_TVM_OWNER_PID``. The script runs ``COMMAND`` as its child and exits with its status. When the
owner dies without stopping the group (SIGKILL, a crash), this script is reparented; it then SIGKILLs its
group: the command and every process the command forked (TVM's ``rpc_server`` serves from
``popen_worker`` children that outlive a killed server), since an RPC server that runs any uploaded
library must not outlive the run that started it. Linux's parent-death signal would reach the command
alone, not its children, and only when the thread that forked it ends: hence a watch of the group.

Nothing here imports the package (or TVM), so it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

OWNER_ENV = "OHQ_TVM_OWNER_PID"
# How often the owner is checked: the longest a group outlives its owner, plus the kernel's teardown.
POLL_S = 0.2


def main(command: list[str]) -> int:
    """Run ``command`` until it exits (its status: 128 + N when a signal N ended it) or the owner dies."""
    owner = int(os.environ[OWNER_ENV])
    child = subprocess.Popen(command)
    while True:
        try:
            status = child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != owner:  # reparented: the owner is gone
                os.killpg(0, signal.SIGKILL)
            continue
        return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
