"""The calling thread's niceness, read from Linux's /proc (None elsewhere)."""
import os
import threading


def thread_nice() -> int | None:
    path = f"/proc/self/task/{threading.get_native_id()}/stat"
    if not os.path.exists(path):
        return None
    return int(open(path).read().rsplit(")", 1)[1].split()[16])
