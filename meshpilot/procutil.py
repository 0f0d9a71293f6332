"""Child processes that die with their parent, without a preexec_fn.

The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) survives execve, so a tiny
interpreter sets it and then execs the real program. Doing the same in a preexec_fn
would run Python between fork() and exec() in a process full of gRPC threads, which
can crash the child.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_LAUNCHER = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL)\n"
    "if os.getppid()!=int(sys.argv[1]):os._exit(1)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the program gets SIGKILL when this process dies (Linux)."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]
