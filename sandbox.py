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
WALL_GRACE = 2.0  # seconds of wall clock past the CPU limit: the interpreter's start, and code that sleeps
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


def child(request):
    """In the forked copy, before anything of the call: a session of its own (the caller kills it as a group), the
    call's directory, its result and output files, and none of the server's descriptors or signal handlers."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(request["work"])
    for fd, path in ((1, request["result"]), (2, request["output"])):
        os.dup2(os.open(path, os.O_WRONLY), fd)
    os.closerange(3, 1 << 16)
    main(request["payload"])


def serve():
    """The fork server: import the preloads, then fork a copy of this clean process per request line on stdin, and
    report on stdout "forked ID PID" at once and "exited PID STATUS" when it ends. Never runs model code itself."""
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
    pending = b""
    while True:
        readable = select.select([0, wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                os.write(1, f"exited {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
        if 0 in readable:
            data = os.read(0, 1 << 20)
            if not data:  # the caller is gone
                os._exit(0)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    try:
                        child(request)
                    finally:
                        os._exit(1)
                os.write(1, f"forked {request['id']} {pid}\n".encode())
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


class ForkServer:
    """The sandbox's interpreter, started ahead of need: a Python that has imported PRELOAD and forks a copy of itself
    for each call (about 1 ms, against ~40 ms of CPU to start a Python and import PRELOAD, which on a small machine
    would be taken from the rollouts' decoding). The copy applies every layer of the module docstring, runs the one
    call and exits; the server itself never runs model code, so nothing passes from one call to the next.
    Thread-safe: the python tool's calls run on worker threads (tools.ToolUse.start)."""

    def __init__(self):
        self.cond, self.proc, self.root, self.pid = threading.Condition(), None, None, os.getpid()
        self.ids, self.forked, self.exited, self.dead = itertools.count(), {}, {}, False
        atexit.register(self.stop)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.forget)

    def start(self):
        """Start the server now (before the first call needs it); a no-op while it runs. Raises SandboxError if no
        Python can be started, or if it cannot run the harness."""
        with self.cond:
            if self.proc is not None and self.proc.poll() is None:
                return
            self._close()
            self.root = tempfile.mkdtemp(prefix="nanor1-")  # the server's error log and one directory per call
            errors = open(os.path.join(self.root, "server-errors"), "w+b")
            try:  # -s -P and an environment of our own, as -I would give, but with a fixed hash seed (-I ignores it)
                self.proc = subprocess.Popen(
                    [sys.executable or "python3", "-s", "-P", "-c", _HARNESS, SANDBOX_MARKER, ",".join(PRELOAD)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, cwd=self.root,
                    env={"PATH": os.defpath, "PYTHONHASHSEED": "0"}, start_new_session=True, close_fds=True)
            except OSError as e:
                errors.close()
                self._close()
                raise SandboxError(f"python sandbox: cannot start {sys.executable or 'python3'}: {e}") from None
            ready = self.proc.stdout.readline()
            if ready != b"ready\n":
                errors.seek(0)
                message = errors.read(2000).decode("utf-8", "replace").strip()
                errors.close()
                status = self.proc.wait()
                self._close()
                raise SandboxError(f"python sandbox: the interpreter exited with status {status} before running the "
                                   f"code: {message}")
            errors.close()
            threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc):
        """The server's reports, as they come: which pid each request got, and how each copy ended."""
        for line in proc.stdout:
            kind, key, value = line.split()
            with self.cond:
                if proc is not self.proc:  # a server since stopped
                    return
                (self.forked if kind == b"forked" else self.exited)[int(key)] = int(value)
                self.cond.notify_all()
        with self.cond:  # the server is gone: every wait below ends
            if proc is self.proc:
                self.dead = True
                self.cond.notify_all()

    def run(self, request, wall_limit):
        """Fork a copy for one call (request: work dir, result and output files, payload) and wait for it, killing it
        at wall_limit seconds. -> (timed out?, its exit status: negative for a signal)."""
        self.start()
        with self.cond:
            rid = next(self.ids)
            self.proc.stdin.write(json.dumps({**request, "id": rid}).encode() + b"\n")
            self.proc.stdin.flush()
            self.cond.wait_for(lambda: rid in self.forked or self.dead, timeout=30)
            if rid not in self.forked:
                raise SandboxError("python sandbox: the fork server did not answer")
            pid = self.forked.pop(rid)
            timed_out = not self.cond.wait_for(lambda: pid in self.exited or self.dead, timeout=wall_limit)
            if timed_out:
                try:
                    os.killpg(pid, signal.SIGKILL)  # the copy and anything it started
                except OSError:
                    pass
                self.cond.wait_for(lambda: pid in self.exited or self.dead, timeout=10)
            if pid not in self.exited:
                raise SandboxError("python sandbox: the fork server ended during a call")
            return timed_out, self.exited.pop(pid)

    def forget(self):
        """In a forked child: the server is the parent's. Drop it without stopping it, closing this process's copy of
        its stdin (the parent's stop() must be able to end it)."""
        if self.proc is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.cond, self.proc, self.root, self.pid = threading.Condition(), None, None, os.getpid()
        self.forked, self.exited, self.dead = {}, {}, False

    def stop(self):
        """Kill the server and remove its directory (at exit, and in tests that look for leftover processes)."""
        with self.cond:
            if os.getpid() == self.pid:
                self._close()

    def _close(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=10)
            self.proc.stdin.close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.proc, self.root, self.forked, self.exited, self.dead = None, None, {}, {}, False


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
    SERVER.start()
    call = tempfile.mkdtemp(prefix="call-", dir=SERVER.root)  # the copy only sees work/
    try:
        work, result, output = (os.path.join(call, name) for name in ("work", "result", "output"))
        os.mkdir(work)
        if os.getuid() == 0:
            os.chown(work, uid, gid)
        for path in (result, output):
            open(path, "wb").close()
        timed_out, returncode = SERVER.run(dict(work=work, result=result, output=output, payload=payload),
                                           timeout + WALL_GRACE)
        with open(result, "rb") as f:
            lines = f.read(1 << 16).decode("utf-8", "replace").splitlines()
        with open(output, "rb") as f:
            output = f.read(MAX_OUTPUT + 1)
    finally:
        shutil.rmtree(call, ignore_errors=True)
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
