"""What ``blockd serve`` (the supervisor, blockd/server.py) tells the nbdkit it runs, through the
environment: its own pid and how many times it has restarted a crashed nbdkit.  Read by ping and the
metrics; a pure module so that every layer may ask."""

import os

ENV_PID = "BLOCKD_SERVE_PID"
ENV_RESTARTS = "BLOCKD_SERVE_RESTARTS"


def serve_pid():
    """The ``blockd serve`` pid when called inside its nbdkit, else this process's."""
    return int(os.environ.get(ENV_PID) or os.getpid())


def serve_restarts():
    """How many times ``blockd serve`` has restarted this nbdkit after a crash (0 for the first)."""
    return int(os.environ.get(ENV_RESTARTS) or 0)

ENV_READY_FD = "BLOCKD_SERVE_READY_FD"


def notify_ready():
    """Called by the plugin once nbdkit serves (listening, control socket up): tells the supervisor this
    nbdkit got through its start, so a later crash of it is not a crash at start (see server.supervise)."""
    fd = os.environ.pop(ENV_READY_FD, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"r")
        os.close(int(fd))
    except (OSError, ValueError):
        pass
