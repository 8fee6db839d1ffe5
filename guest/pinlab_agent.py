#!/usr/bin/env python3
"""pinlab guest agent: one long-lived Python process per guest boot that runs workload
commands (matrix cells) without paying for an interpreter start and imports each time
(about 0.65 s of TCG time per cell), reloads pinlab.ko, and reads the kernel log.

Standard library only. The host starts it over an SSH exec channel and speaks JSON
lines: one request object per stdin line, one response object per stdout line. The
first line it prints is {"ready": true, ...}. Framing is pinlab.common.jsonlines (pushed
with this package); a request line longer than MAX_REQUEST bytes is answered with an error
and skipped.

Requests (``op``):
  ping                                   -> {"ok": true, "pid", "kernel"}
  reload   {module, name, device}        -> rmmod + insmod + wait for the device node
  dmesg-mark                             -> {"mark": N}: a kmsg reader positioned at the end
  dmesg-since {mark}                     -> {"text": ...}: records after the mark, as dmesg
  run      {argv, timeout}               -> {"report": ..., "exit", "ms", "output"}
  start    {argv, timeout}               -> {"job": N, "pid"}: run, answered at once
  wait     {job, until, timeout}         -> until "ready": {"ready": true, "ms"} once the
                                            child wrote "ready" on $PINLAB_NOTIFY_FD;
                                            until "done" (or ended first): as ``run``
  write    {path, text, wait_for}        -> {"ok", "ms"} (a sysfs write; errors: errno)
  read     {path}                        -> {"text"}
  listdir  {path}                        -> {"names"}
  exit                                   -> the agent exits

``run`` forks: the child runs ``pinlab.guest.workload <argv>`` (same parser, same report)
in a fresh process with its stdout/stderr going to a file, so a cell gets a process of its
own (its mm, its cgroup membership) and stray output cannot corrupt this protocol.  A child that
does not report within ``timeout`` is killed; one stuck in the kernel is left and reported
(``stuck``), and the host reboots the guest.
"""
import contextlib
import ctypes
import errno
import os
import select
import signal
import sys
import time

from pinlab.common import jsonlines
from pinlab.common.vocab import AGENT_CELL_OUTPUT, NOTIFY_FD_ENV
from pinlab.guest import pinlab_kmsg, workload

SYS_DELETE_MODULE = 176       # x86_64
SYS_FINIT_MODULE = 313
O_NONBLOCK = os.O_NONBLOCK
CELL_OUTPUT = AGENT_CELL_OUTPUT
MAX_REQUEST = 1 << 20         # bytes in one request line

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr, *args):
    if _libc.syscall(nr, *args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ------------------------------------------------------------------ module reload
def module_loaded(name):
    return os.path.exists(f"/sys/module/{name}")


def reload(req):
    name, path = req.get("name", "pinlab"), req["module"]
    device = req.get("device", "/dev/pinlab0")
    t0 = time.monotonic()
    if module_loaded(name):
        deadline = t0 + 10
        while True:   # a just-closed file may hold the module for a moment
            try:
                _syscall(SYS_DELETE_MODULE, name.encode(), O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY, errno.EWOULDBLOCK) \
                        or time.monotonic() > deadline:
                    return {"error": f"rmmod {name}: {exc}"}
                time.sleep(0.05)
    t1 = time.monotonic()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _syscall(SYS_FINIT_MODULE, fd, req.get("params", "").encode(), 0)
    except OSError as exc:
        return {"error": f"insmod {path}: {exc}"}
    finally:
        os.close(fd)
    t2 = time.monotonic()
    while not os.path.exists(device):
        if time.monotonic() - t2 > 10:
            return {"error": f"no {device} 10 s after insmod"}
        time.sleep(0.01)
    t3 = time.monotonic()
    return {"ok": True, "rmmod_ms": round((t1 - t0) * 1000, 1),
            "insmod_ms": round((t2 - t1) * 1000, 1), "node_ms": round((t3 - t2) * 1000, 1)}


# ------------------------------------------------------------------ kernel log
_marks = {}
_next_mark = [0]
MAX_MARKS = 8       # a mark nobody read (the host's cell failed in between) is dropped


def dmesg_mark(_req):
    """A /dev/kmsg reader positioned after the newest record."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | O_NONBLOCK | os.O_CLOEXEC)
    os.lseek(fd, 0, os.SEEK_END)
    _next_mark[0] += 1
    _marks[_next_mark[0]] = fd
    while len(_marks) > MAX_MARKS:
        os.close(_marks.pop(min(_marks)))
    return {"mark": _next_mark[0]}


def dmesg_since(req):
    fd = _marks.pop(int(req["mark"]), None)
    if fd is None:
        return {"error": f"unknown dmesg mark {req['mark']}"}
    try:
        records, lost = pinlab_kmsg.read_records(fd)
    finally:
        os.close(fd)
    return {"text": "".join(pinlab_kmsg.format_record(r) + "\n" for r in records),
            "lost": lost}


# ------------------------------------------------------------------ workload commands
def _child(argv, w):
    """In the forked child: run the command, write its report to ``w``, never return."""
    code = 0
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(CELL_OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout = os.fdopen(1, "w", closefd=False)
        sys.stderr = os.fdopen(2, "w", closefd=False)
        try:
            args = workload.parser().parse_args(argv)
        except SystemExit:
            report = {"error": f"bad workload arguments: {argv}"}
        else:
            report = workload.run(args)
        os.write(w, jsonlines.encode(report, default=str))
    except BaseException as exc:  # noqa: BLE001 - the child must never return
        with contextlib.suppress(Exception):
            os.write(w, jsonlines.encode({"error": f"agent child: {exc!r}"}))
        code = 1
    finally:
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os._exit(code)


def _output_tail():
    try:
        with open(CELL_OUTPUT, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return ""


MAX_JOBS = 4
_jobs = {}
_next_job = [0]


def _start(req):
    """Fork a child running the workload; returns the job (a dict) without waiting."""
    argv, timeout = [str(a) for a in req["argv"]], float(req.get("timeout", 300))
    r, w = os.pipe()          # the child's report, read to its end
    nr, nw = os.pipe()        # the child's notifications: one line each ("ready")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(nr)
        os.environ[NOTIFY_FD_ENV] = str(nw)
        _child(argv, w)
    os.close(w)
    os.close(nw)
    return {"argv": argv, "timeout": timeout, "pid": pid, "t0": t0, "deadline": t0 + timeout,
            "r": r, "nr": nr, "chunks": [], "notes": b"", "eof": False, "ready_ms": None}


def _pump(job, until_ready, deadline):
    """Read the job's pipes until its report ended, or (``until_ready``) it said ready, or
    ``deadline`` (monotonic) passed."""
    while not job["eof"] and not (until_ready and job["ready_ms"] is not None):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        fds = [job["r"]] + ([job["nr"]] if job["nr"] is not None else [])
        ready, _, _ = select.select(fds, [], [], left)
        for fd in ready:
            b = os.read(fd, 65536)
            if fd == job["r"]:
                if b:
                    job["chunks"].append(b)
                else:
                    job["eof"] = True
            elif not b:
                os.close(job["nr"])
                job["nr"] = None
            else:
                job["notes"] += b
                if job["ready_ms"] is None and b"ready\n" in job["notes"]:
                    job["ready_ms"] = round((time.monotonic() - job["t0"]) * 1000, 1)


def _finish(job):
    """Kill the job if its report did not end by its deadline, reap it, and answer."""
    argv, timeout, pid, t0 = job["argv"], job["timeout"], job["pid"], job["t0"]
    _pump(job, False, job["deadline"])
    for fd in (job["r"], job["nr"]):
        if fd is not None:
            os.close(fd)
    timed_out = not job["eof"]
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    status = None
    wait_until = time.monotonic() + (5 if timed_out else 60)
    while time.monotonic() < wait_until:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.01)
    resp = {"ms": round((time.monotonic() - t0) * 1000, 1), "pid": pid,
            "exit": os.waitstatus_to_exitcode(status) if status is not None else None,
            "output": _output_tail(), "ready_ms": job["ready_ms"]}
    if status is None:
        resp["stuck"] = True   # in the kernel (D state): the host reboots the guest
    try:
        resp["report"] = jsonlines.decode(b"".join(job["chunks"]) or b"null")
    except jsonlines.FramingError:
        resp["report"] = None
    if timed_out:
        resp["error"] = f"workload {' '.join(argv)} gave no report within {timeout:.0f}s"
    elif not isinstance(resp["report"], dict):
        resp["error"] = f"workload {' '.join(argv)} gave no report (exit {resp['exit']})"
    return resp


def run(req):
    """Run a workload command and answer with its report (the job's whole life)."""
    return _finish(_start(req))


def start(req):
    """Start a workload command and answer at once with its job number; ``wait`` gets
    its notifications and its report. The host does its part of a cell (QMP device_del,
    a DIMM) in between."""
    if len(_jobs) >= MAX_JOBS:
        return {"error": f"{MAX_JOBS} jobs already started and not waited for"}
    job = _start(req)
    _next_job[0] += 1
    _jobs[_next_job[0]] = job
    return {"job": _next_job[0], "pid": job["pid"]}


def wait(req):
    """``until`` "ready": answer {"ready": true, "ms"} once the job notified it, within
    ``timeout`` seconds (default: the job's own). A job that ends first, or is not ready
    in time (it is then killed), is answered as by ``run``, and so is ``until`` "done"."""
    num = int(req["job"])
    job = _jobs.get(num)
    if job is None:
        return {"error": f"unknown job {num}"}
    if req.get("until", "done") == "ready":
        limit = min(job["deadline"], time.monotonic() + float(req.get("timeout", 1e9)))
        _pump(job, True, limit)
        if job["ready_ms"] is not None:
            return {"ready": True, "job": num, "ms": job["ready_ms"]}
        if not job["eof"]:
            job["deadline"] = time.monotonic()   # not ready in time: killed by _finish
            resp = _finish(_jobs.pop(num))
            resp["error"] = f"workload {' '.join(job['argv'])} was not ready in time"
            return resp
    return _finish(_jobs.pop(num))


def kill_jobs():
    """Kill every job not waited for (the agent is exiting)."""
    for job in _jobs.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job["pid"], signal.SIGKILL)
    _jobs.clear()


# ------------------------------------------------------------------ guest files
def write(req):
    """Write ``text`` to ``path`` (sysfs: one write); then, with ``wait_for``, wait until
    that path exists, at most ``wait_timeout`` s (default 10)."""
    t0 = time.monotonic()
    try:
        fd = os.open(req["path"], os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(req["text"]).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        return {"error": f"write {req['path']}: {exc}", "errno": exc.errno,
                "ms": round((time.monotonic() - t0) * 1000, 1)}
    resp = {"ok": True, "ms": round((time.monotonic() - t0) * 1000, 1)}
    if req.get("wait_for"):
        t1, limit = time.monotonic(), float(req.get("wait_timeout", 10))
        while not os.path.exists(req["wait_for"]):
            if time.monotonic() - t1 > limit:
                resp = {"error": f"no {req['wait_for']} {limit:.0f} s after writing "
                                 f"{req['path']}", "ms": resp["ms"]}
                break
            time.sleep(0.05)
    return resp


def read(req):
    with open(req["path"], errors="replace") as f:
        return {"text": f.read()}


def listdir(req):
    return {"names": sorted(os.listdir(req["path"]))}


OPS = {
    "ping": lambda req: {"ok": True, "pid": os.getpid(), "kernel": os.uname().release},
    "reload": reload,
    "dmesg-mark": dmesg_mark,
    "dmesg-since": dmesg_since,
    "run": run,
    "start": start,
    "wait": wait,
    "write": write,
    "read": read,
    "listdir": listdir,
}


def main():
    proto = os.fdopen(os.dup(1), "wb")
    # stray output (ours or a library's) must never reach the protocol stream
    log = os.open("/tmp/pinlab-agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    sys.stdout = os.fdopen(1, "w", closefd=False)

    def send(obj):
        proto.write(jsonlines.encode(obj, default=str))
        proto.flush()

    send({"ready": True, "pid": os.getpid(), "kernel": os.uname().release})
    requests = jsonlines.Reader(lambda n: os.read(0, n), MAX_REQUEST)
    while True:
        req = None
        try:
            line = requests.read_line()
            if line is None:
                break
            if not line.strip():
                continue
            req = jsonlines.decode_object(line)
            op = req.get("op")
            if op == "exit":
                send({"ok": True})
                break
            fn = OPS.get(op)
            resp = fn(req) if fn else {"error": f"unknown op {op!r}"}
        except jsonlines.Truncated:
            break   # the host went away in the middle of a request
        except Exception as exc:  # noqa: BLE001 - answer every request
            resp = {"error": f"{type(exc).__name__}: {exc}"}
        resp["id"] = req.get("id") if isinstance(req, dict) else None
        send(resp)
    kill_jobs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
