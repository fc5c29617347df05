"""
machinery/interrupt.py: Ctrl-C as one line and exit status 130, from a script's first line on. It
imports nothing heavy, so a script installs it before torch loads (seconds in which Ctrl-C would
otherwise be a traceback). A first read skips this file.
"""
import signal
import sys


def one_line_on_ctrl_c(script, then=""):
    """From now on Ctrl-C stops the script with `script: stopped (Ctrl-C)` + then on stderr and exit
    status 130, never a traceback. train.py's loop sets its own handler while it trains (machinery/
    runtime.py's CtrlC: it finishes the step and writes resume.pt) and puts this one back after.
    A SIGINT that was ignored (a background job of a shell) stays ignored."""
    def stop(signum, frame):
        print(f"{script}: stopped (Ctrl-C){then}", file=sys.stderr)
        raise SystemExit(130)               # finally blocks still run: temporaries are removed
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)
