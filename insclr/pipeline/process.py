"""Running one stage's command so that stopping the pipeline stops the stage too.

The command runs in a process group of its own. A SIGINT, SIGTERM or SIGHUP that reaches the
pipeline (a Ctrl-C at the terminal, `kill PID` of the pipeline alone, a closed session) is
passed on to that group (torchrun then stops its workers) and the pipeline waits for the
command to end before it exits, so nothing keeps running or writing behind it. A command
still running `GRACE_S` seconds after the signal is killed (SIGKILL to its group).
"""

import os
import signal
import subprocess
import sys
import threading

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 90  # torchrun gives its workers 30 s after a signal before it kills them itself


class Interrupted(Exception):
    """The pipeline got a signal; the stage it was running has stopped."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _signal_group(child, signum):
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass  # ended meanwhile


def run_command(argv, label, env=None, grace=GRACE_S):
    """Run `argv` (in environment `env`, default ours) to its end and return its exit code; raise
    Interrupted if a signal came meanwhile. label: how the command is named in messages ('stage s1').
    """
    received, child = [], None

    def forward(signum, frame):
        if child is None:
            received.append(signum)  # still starting: passed on once it has started
            return
        if not received:
            print(f"\n{signal.Signals(signum).name}: stopping {label} (pid {child.pid}) and waiting for it "
                  f"(killed in {grace} s if it has not ended)", file=sys.stderr)
            _signal_group(child, signum)
            signal.setitimer(signal.ITIMER_REAL, grace)
        received.append(signum)  # a second Ctrl-C does not cut the stage's own clean-up short

    def kill(signum, frame):
        print(f"{label} has not ended {grace} s after the signal: killing it", file=sys.stderr)
        _signal_group(child, signal.SIGKILL)

    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        return subprocess.run(argv, env=env).returncode
    handlers = {s: signal.signal(s, forward) for s in FORWARDED}
    handlers[signal.SIGALRM] = signal.signal(signal.SIGALRM, kill)
    try:
        child = subprocess.Popen(argv, env=env, process_group=0)
        if received:
            forward(received.pop(0), None)
        code = child.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0])
    return code
