"""The watchdog process of a multi-worker start-up (`training.strategy`); standard library only.

While TensorFlow waits inside C++ for the other workers of `TF_CONFIG`, the waiting process runs
no Python code and obeys no signal but SIGKILL. This small process ends it: run as
`python watchdog.py PARENT_PID TIMEOUT SIGNAL_FD TIMEOUT_MESSAGE SIGINT_MESSAGE SIGTERM_MESSAGE`,
it waits until its stdin is closed (the wait is over: exit 0), `TIMEOUT` seconds pass, or a signal
number arrives on the pipe `SIGNAL_FD` (the parent's `signal.set_wakeup_fd`); then it prints that
case's message to stderr and kills the parent with SIGKILL (exit status 137).
"""

import os
import select
import signal
import sys


def main(argv):
    """Waits as the module docstring says; returns the exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    parent, timeout, signals = int(argv[0]), float(argv[1]), int(argv[2])
    messages = {None: argv[3], signal.SIGINT: argv[4], signal.SIGTERM: argv[5]}
    readable, _, _ = select.select([sys.stdin, signals], [], [], timeout)
    if sys.stdin in readable:  # closed by the parent: the wait is over
        return 0
    signum = os.read(signals, 1)[0] if readable else None
    sys.stderr.write(messages.get(signum, messages[signal.SIGTERM]) + "\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
