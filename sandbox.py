"""
Model-written Python runs here, never in the caller's process. One sandbox serves both users: reward.code_reward
(does the code pass its tests?) and the python tool of tools.py (what does the program print?).

    run = run_python("print(2 ** 10)", timeout=5)      # Run(output=b'1024\\n', truncated=False, error=None, ...)

What holds the code in, outermost first:
  - a process of its own for each call, in a session of its own, in an empty temporary directory, with a PATH-only
    environment: a copy forked from a Python that has done nothing but import PRELOAD (ForkServer), so nothing passes
    from one call to the next; the wall-clock limit SIGKILLs the whole process group, so nothing the code starts
    outlives the call;
  - kernel limits: CPU seconds (the `timeout`), address space, file size, open files, no core dumps, no new processes;
  - as root (CI runs as root): new network and mount namespaces -- no network interface but a loopback that is down,
    and a private empty /tmp, /var/tmp and /dev/shm (each one Python does not itself read from: a virtualenv under
    /tmp keeps it) -- then the unprivileged user `nobody`, for whom the limit on new processes holds;
  - as another user: a new user + network namespace where the kernel allows one (the network is closed, but the code
    can read what that user can read), and otherwise only the Python-level guard below keeps the network closed
    (isolation() says which of these held);
  - a Python audit hook (PEP 578), installed before the code runs, which Python code cannot remove: no sockets, no
    subprocess / exec / fork / kill, no ctypes or sqlite, no file written, created or removed outside the working
    directory (by path: a write through another directory's descriptor is not seen).
The hook stops a model's stray call, not a program written to escape: the kernel layers are the boundary. Likewise
the harness reports test results from inside the process the code runs in, so code written to attack the harness
(not a solution) could forge them; the setup report it cannot forge (it is read only up to the "ready" line).
Runs are reproducible: a fixed hash seed, `random` (and numpy's) seeded, and the limit that stops a busy loop is CPU
time, which does not depend on the machine's load (the wall-clock limit, for code that sleeps, does).
"""
import atexit
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

MAX_OUTPUT = 64 * 1024  # bytes of stdout + stderr that come back
WALL_GRACE = 2.0  # seconds of wall clock past the CPU limit: the copy's start and imports, and code that sleeps
SANDBOX_MARKER = "nanor1-sandbox"  # in the child's argv, so tests can look for leftovers
PRELOAD = ("math cmath collections itertools functools heapq bisect re string typing fractions decimal random "
           "statistics operator copy array datetime dataclasses enum unicodedata traceback").split()
PRELOAD_IF_USED = ("numpy", "sympy")  # slower to import: only when the code names them (and installed)

_HARNESS = r'''
import json, math, os, resource, select, signal, sys
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, MS_REC, MS_PRIVATE = 0x20000, 0x10000000, 0x40000000, 0x4000, 0x40000
BLOCKED = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.system",
           "os.kill", "os.killpg", "pty.", "gc.get_", "sqlite3.")
PATH_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
               "os.symlink", "os.link", "shutil.")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def isolate(payload):
    """Namespaces (where the kernel lets us), limits, then nobody: nothing from the model has run yet."""
    import ctypes
    libc, done = ctypes.CDLL(None, use_errno=True), []
    if os.getuid() == 0 and libc.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0:
        done.append("network namespace")
        # an empty tmpfs over each scratch directory, but not over one Python itself reads from (a venv in /tmp)
        python = [os.path.realpath(p) + os.sep for p in sys.path + [sys.prefix, sys.base_prefix] if p]
        scratch = [d for d in ("/tmp", "/var/tmp", "/dev/shm")
                   if os.path.isdir(d) and not any(p.startswith(d + os.sep) for p in python)]
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0 and scratch and all(
                libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=1m") == 0 for d in scratch):
            done.append("private " + " ".join(scratch))
    elif os.getuid() != 0 and hasattr(libc, "unshare") and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        done.append("network namespace")
    spent = math.ceil(sum(os.times()[:2]))  # CPU seconds before the code: the warm start and the call's imports
    for key, value in payload["limits"].items():
        value = [v + spent for v in value] if key == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, key), tuple(value) if isinstance(value, list) else (value, value))
    if os.getuid() == 0:
        os.setgroups([]); os.setgid(payload["gid"]); os.setuid(payload["uid"])
        done.append("user nobody")
    if hasattr(libc, "prctl"):  # PR_SET_PDEATHSIG, SIGKILL: die with the fork server (a uid change clears it)
        libc.prctl(1, 9)
        if os.getppid() != payload["server"]:
            raise RuntimeError("the fork server is gone")
    return done


def guard(work):
    def outside(path):
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path != work and not path.startswith(work + os.sep)

    def hook(event, args):
        if event.startswith(BLOCKED):
            raise PermissionError(f"{event}: not allowed in the nanoR1 sandbox")
        if event == "open" and args[0] is not None and outside(args[0]) and (
                any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & WRITE_FLAGS):
            raise PermissionError(f"writing {args[0]!r}: outside the sandbox's directory")
        if event.startswith(PATH_EVENTS) and any(isinstance(a, (str, bytes, os.PathLike)) and outside(a) for a in args):
            raise PermissionError(f"{event} {args[0]!r}: outside the sandbox's directory")
    return hook


def main(payload, write=os.write, dumps=json.dumps, exit=os._exit):
    nonce, result_fd, program = payload["nonce"], os.dup(1), not payload["tests"]
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        if program:  # the python tool: stdout joins stderr in the output file, a line at a time as on a terminal
            os.dup2(2, 1)
            sys.stdout.reconfigure(line_buffering=True)
        else:  # code_reward: what a solution prints goes nowhere (its tests decide)
            os.dup2(null, 1), os.dup2(null, 2)
        for name in payload["preload"]:
            try:
                __import__(name)
            except Exception:
                pass
        import random
        import traceback
        random.seed(0)
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed(0)
        work = os.getcwd()
        isolation = isolate(payload)
        sys.addaudithook(guard(work))
    except BaseException as e:
        write(result_fd, (nonce + dumps({"setup_error": repr(e)}) + "\n").encode())
        exit(1)
    write(result_fd, (nonce + "ready\n").encode())  # from here on the code runs: no setup report counts
    code, tests = payload["code"], payload["tests"]
    del payload
    ns, passed, error = {"__name__": "__main__" if program else "solution"}, 0, None
    try:
        exec(compile(code, "<code>", "exec"), ns)
    except SystemExit as e:
        error = None if e.code in (None, 0) else "SystemExit"
        tests = []
    except BaseException as e:
        error = type(e).__name__
        tests = []
        try:
            sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        except BaseException:
            pass
    for test in tests:
        try:
            exec(compile(test, "<test>", "exec"), ns)
            passed += 1
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    # on a line of its own, whatever the code wrote to this descriptor
    write(result_fd, ("\n" + nonce + dumps({"passed": passed, "error": error, "isolation": isolation}) + "\n").encode())
    exit(0)


def child(call):
    """In the forked copy, before anything of the call: a session of its own, the call's directory, its result and
    output files, its payload (read, then removed: the server never holds one), and none of the server's descriptors
    or signal handlers."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd, name in ((1, "result"), (2, "output")):
        os.dup2(os.open(os.path.join(call, name), os.O_WRONLY), fd)
    os.closerange(3, 1 << 16)
    with open(os.path.join(call, "payload"), "rb") as f:
        payload = json.loads(f.read())
    os.remove(os.path.join(call, "payload"))
    os.chdir(os.path.join(call, "work"))
    main(payload)


def serve():
    """The fork server: import the preloads, then read request lines on stdin -- {"id": ID, "call": DIR} forks a copy
    of this clean process for the call in DIR, {"kill": ID} kills that copy's process group -- and report
    "exited ID STATUS" on stdout as each copy ends. Never runs model code itself; at EOF it kills its copies."""
    for name in sys.argv[2].split(","):
        try:
            __import__(name)
        except Exception:
            pass
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # SIGCHLD wakes the select below
    signal.signal(signal.SIGCHLD, lambda *_: None)
    os.write(1, b"ready\n")
    copies, pending = {}, b""  # pid -> request id, for the copies not yet reaped (their pids cannot be reused)
    while True:
        readable = select.select([0, wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 4096)
            while copies:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                os.write(1, f"exited {copies.pop(pid)} {os.waitstatus_to_exitcode(status)}\n".encode())
        if 0 not in readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:  # the caller is gone, or stops us
            for pid in copies:
                os.killpg(pid, signal.SIGKILL)
            os._exit(0)
        *lines, pending = (pending + data).split(b"\n")
        for request in map(json.loads, lines):
            if "kill" in request:
                for pid in [p for p, rid in copies.items() if rid == request["kill"]]:
                    os.killpg(pid, signal.SIGKILL)  # the copy and anything it started
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    child(request["call"])
                finally:
                    os._exit(1)
            copies[pid] = request["id"]
serve()
'''


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (configuration, not model output)."""


@dataclass
class Run:
    output: bytes  # the code's stdout and stderr, interleaved, at most MAX_OUTPUT bytes
    truncated: bool  # it wrote more than that
    error: str | None  # None, "timeout", or the exception the code ended with ("ZeroDivisionError", ...)
    passed: int  # how many of the tests passed (they run after the code, in its namespace, if it ended cleanly)
    isolation: tuple = ()  # the kernel layers that held: "network namespace", "private /tmp", "user nobody"


class _Server:
    """One fork-server process: its directory (one sub-directory per call) and the exits it has reported."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="nanor1-")
        self.cond, self.exited, self.dead, self.writing = threading.Condition(), {}, False, threading.Lock()
        errors = open(os.path.join(self.root, "server-errors"), "w+b")
        try:  # -s -P and an environment of our own, as -I would give, but with a fixed hash seed (-I ignores it)
            self.proc = subprocess.Popen(
                [sys.executable or "python3", "-s", "-P", "-c", _HARNESS, SANDBOX_MARKER, ",".join(PRELOAD)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, cwd=self.root, bufsize=0,
                env={"PATH": os.defpath, "PYTHONHASHSEED": "0"}, start_new_session=True, close_fds=True)
        except OSError as e:
            errors.close()
            shutil.rmtree(self.root, ignore_errors=True)
            raise SandboxError(f"python sandbox: cannot start {sys.executable or 'python3'}: {e}") from None
        with errors:
            if self.proc.stdout.readline() != b"ready\n":
                status = self.proc.wait()
                errors.seek(0)
                message = errors.read(2000).decode("utf-8", "replace").strip()
                self.close()
                raise SandboxError(f"python sandbox: the interpreter exited with status {status} before running the "
                                   f"code: {message}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            _, rid, status = line.split()
            with self.cond:
                self.exited[int(rid)] = int(status)
                self.cond.notify_all()
        with self.cond:  # the server is gone: every wait ends
            self.dead = True
            self.cond.notify_all()

    def send(self, request):
        try:
            with self.writing:
                self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise SandboxError(f"python sandbox: the fork server is gone ({e})") from None

    def wait(self, rid, timeout):
        """The exit status of request rid's copy, or None if it is still running after timeout (or the server died)."""
        with self.cond:
            self.cond.wait_for(lambda: rid in self.exited or self.dead, timeout=timeout)
            return self.exited.pop(rid, None)

    def close(self):
        """End of input: the server kills its copies and exits (killed if it does not)."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


class ForkServer:
    """The sandbox's interpreter, started ahead of need: a Python that has imported PRELOAD and forks a copy of itself
    for each call (about 1 ms, against ~40 ms of CPU to start a Python and import PRELOAD, which on a small machine
    would be taken from the rollouts' decoding). The copy reads its payload from a file only it and its caller see,
    applies every layer of the module docstring, runs the one call and exits; the server itself never runs model code
    nor holds a payload, so nothing passes from one call to another. Thread-safe: the python tool's calls run on
    worker threads (tools.ToolUse.start)."""

    def __init__(self):
        self.lock, self.server, self.pid, self.ids = threading.Lock(), None, os.getpid(), itertools.count()
        atexit.register(self.stop)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.forget)

    @property
    def proc(self):
        return None if self.server is None else self.server.proc

    def start(self):
        """The running server, started now if there is none (before the first call needs it). Raises SandboxError if
        no Python can be started, or if it cannot run the harness."""
        with self.lock:
            if self.server is None or self.server.dead or self.server.proc.poll() is not None:
                if self.server is not None:
                    self.server.close()
                self.server = None
                self.server = _Server()
            return self.server

    def call(self, payload, wall_limit):
        """Run one payload in a fresh copy, killed at wall_limit seconds. -> (timed out?, its exit status (negative:
        a signal), the lines of its result file, its output bytes (at most MAX_OUTPUT + 1))."""
        server = self.start()
        try:
            call = tempfile.mkdtemp(prefix="call-", dir=server.root)  # the copy sees work/ alone once isolated
            work = os.path.join(call, "work")
            os.mkdir(work)
            if os.getuid() == 0:
                os.chown(work, payload["uid"], payload["gid"])
            for name in ("result", "output"):
                open(os.path.join(call, name), "wb").close()
            fd = os.open(os.path.join(call, "payload"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps({**payload, "server": server.proc.pid}).encode())
        except OSError as e:  # (a server stopped meanwhile took its directory along)
            raise SandboxError(f"python sandbox: cannot prepare the call: {e}") from None
        try:
            rid = next(self.ids)
            server.send({"id": rid, "call": call})
            status = server.wait(rid, wall_limit)
            timed_out = status is None and not server.dead
            if timed_out:
                server.send({"kill": rid})
                status = server.wait(rid, 10)
            if status is None:
                raise SandboxError("python sandbox: the fork server ended during a call")
            with open(os.path.join(call, "result"), "rb") as f:
                lines = f.read(1 << 16).decode("utf-8", "replace").splitlines()
            with open(os.path.join(call, "output"), "rb") as f:
                return timed_out, status, lines, f.read(MAX_OUTPUT + 1)
        finally:
            shutil.rmtree(call, ignore_errors=True)

    def forget(self):
        """In a forked child: the server is the parent's. Drop it without stopping it, closing this process's copy of
        its stdin (unbuffered: nothing half-written is flushed), so the parent's stop() still ends it."""
        if self.server is not None:
            try:
                self.server.proc.stdin.close()
            except OSError:
                pass
        self.lock, self.server, self.pid = threading.Lock(), None, os.getpid()

    def stop(self):
        """Stop the server, its copies and its directory (at exit, and in tests that look for leftover processes)."""
        with self.lock:
            if os.getpid() == self.pid and self.server is not None:
                self.server.close()
            self.server = None


def nobody():
    try:
        import pwd

        return pwd.getpwnam("nobody")[2:4]
    except (ImportError, KeyError):
        return 65534, 65534


SERVER = ForkServer()


def run_python(code, tests=(), timeout=5.0, memory_mb=1024):
    """Run `code` (then each of `tests`, Python statements) in the sandbox; returns within about `timeout` s."""
    uid, gid = nobody()
    nonce = secrets.token_hex(16)
    # CPU seconds stop a busy loop whatever the load (SIGXCPU at the soft limit); the wall clock, with room for the
    # interpreter's start, stops code that sleeps
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": [math.ceil(timeout), math.ceil(timeout) + 1],
              "RLIMIT_FSIZE": 1 << 20, "RLIMIT_NPROC": 0, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
    preload = [m for m in PRELOAD_IF_USED if m in code]  # (PRELOAD is imported before the call arrives)
    payload = {"code": code, "tests": list(tests), "nonce": nonce, "limits": limits, "uid": uid, "gid": gid,
               "preload": preload}
    timed_out, returncode, lines, output = SERVER.call(payload, timeout + WALL_GRACE)
    reports = [line[len(nonce):] for line in lines if line.startswith(nonce)]
    if reports and reports[0] != "ready":  # a broken sandbox must be loud, not a silent failure of the code
        raise SandboxError(f"python sandbox setup failed: {json.loads(reports[0]).get('setup_error')}")
    if not reports and not timed_out and returncode is not None and returncode > 0:  # ended before the code ran
        raise SandboxError(f"python sandbox: the interpreter exited with status {returncode} before running the "
                           f"code: {output[:2000].decode('utf-8', 'replace').strip()}")
    report = next((r for r in map(_json_or_none, reports[:0:-1]) if isinstance(r, dict) and "passed" in r), {})
    out_of_time = timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not report
    error = "timeout" if out_of_time else report.get("error", "crashed") if report else "crashed"
    return Run(output[:MAX_OUTPUT], len(output) > MAX_OUTPUT, error, int(report.get("passed", 0)),
               tuple(report.get("isolation", ())))


def _json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def isolation():
    """What holds here besides the process, its limits and the audit hook: e.g. ('network namespace', 'private /tmp
    /var/tmp /dev/shm', 'user nobody') as root; () where no namespace could be made (then only the audit hook closes
    the network)."""
    return run_python("", timeout=10).isolation
