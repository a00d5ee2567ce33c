"""
Model-written Python runs here, never in the caller's process. One sandbox serves both users: reward.code_reward
(does the code pass its tests?) and the python tool of tools.py (what does the program print?).

    run = run_python("print(2 ** 10)", timeout=5)      # Run(output=b'1024\\n', truncated=False, error=None, ...)

What holds the code in, outermost first:
  - a fresh Python in a session of its own, in an empty temporary directory, with a PATH-only environment; the
    wall-clock limit SIGKILLs the whole process group, so nothing the code starts outlives the call;
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
import json, math, os, resource, sys
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


def main(write=os.write, dumps=json.dumps, exit=os._exit):
    for name in sys.argv[2].split(","):  # the warm part, done before the call arrives
        try:
            __import__(name)
        except Exception:
            pass
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))  # waits for the call
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
main()
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


class Interpreter:
    """One sandbox interpreter, started ahead of its call: a fresh Python that has imported PRELOAD and waits on
    stdin for the one call it will run, in an empty working directory of its own. Runs one call, then is killed."""

    def __init__(self):
        uid, gid = nobody()
        self.proc, self.result, self.output = None, None, None
        self.root = tempfile.mkdtemp(prefix="nanor1-")  # holds the two files below; the child only sees work/
        try:  # -s -P and an environment of our own, as -I would give, but with a fixed hash seed (-I ignores it)
            work = os.path.join(self.root, "work")
            os.mkdir(work)
            if os.getuid() == 0:
                os.chown(work, uid, gid)
            self.result = open(os.path.join(self.root, "result"), "w+b")
            self.output = open(os.path.join(self.root, "output"), "w+b")
            self.proc = subprocess.Popen(
                [sys.executable or "python3", "-s", "-P", "-c", _HARNESS, SANDBOX_MARKER, ",".join(PRELOAD)],
                stdin=subprocess.PIPE, stdout=self.result, stderr=self.output, cwd=work,
                env={"PATH": os.defpath, "PYTHONHASHSEED": "0"}, start_new_session=True, close_fds=True)
        except OSError as e:
            self.close()
            raise SandboxError(f"python sandbox: cannot start {sys.executable or 'python3'}: {e}") from None

    def run(self, payload, wall_limit):
        """Hand the call over and wait for it. -> (timed out?, the harness's result lines, the output bytes)."""
        timed_out = False
        try:
            self.proc.communicate(payload, timeout=wall_limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            self.kill()
        self.result.seek(0)
        self.output.seek(0)
        return timed_out, self.result.read(1 << 16).decode("utf-8", "replace").splitlines(), \
            self.output.read(MAX_OUTPUT + 1)

    def kill(self):
        if self.proc is None or self.proc.returncode is not None:  # once: after the wait its pid may be reused
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the child and anything it started
        except OSError:
            pass
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self):
        self.kill()
        for f in (self.result, self.output):
            if f is not None:
                f.close()
        shutil.rmtree(self.root, ignore_errors=True)


class WarmPool:
    """Interpreters started ahead of need: taking one starts its replacement at once (a Popen: the new interpreter
    starts while the call runs), so a call pays for no interpreter start unless more calls run at once than spares
    were warmed (warm(n)). Every interpreter serves exactly one call, so nothing passes from one call to the next."""

    def __init__(self):
        self.lock, self.spares, self.wanted, self.pid = threading.Lock(), [], 1, os.getpid()
        atexit.register(self.stop)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.forget)

    def forget(self):
        """In a forked child: the interpreters are the parent's. Drop them without killing them, closing this
        process's copies of their stdin (else a spare would never see its call end) and a lock another thread may
        have held at the fork."""
        for spare in self.spares:
            for f in (spare.proc.stdin, spare.result, spare.output):
                try:
                    f.close()
                except OSError:
                    pass
        self.lock, self.spares, self.pid = threading.Lock(), [], os.getpid()

    def warm(self, n):
        """Keep at least n interpreters ready (one per call that may run at once)."""
        with self.lock:
            self.wanted = max(self.wanted, n)
        self.refill()

    def take(self):
        """A waiting interpreter, or a new one when none is. One that ended while waiting is never handed a call: if
        it could not run the harness, neither can the new one, and run_python says so."""
        spare = None
        with self.lock:
            while self.spares and spare is None:
                spare = self.spares.pop(0)
                if spare.proc.poll() is not None:
                    spare.close()
                    spare = None
        try:
            self.refill()
            return spare or Interpreter()
        except BaseException:
            if spare is not None:
                spare.close()
            raise

    def refill(self):
        with self.lock:
            while len(self.spares) < self.wanted:
                self.spares.append(Interpreter())

    def stop(self):
        """Kill the interpreters waiting (at exit, and in tests that look for leftover processes)."""
        with self.lock:
            spares, self.spares = (self.spares, []) if os.getpid() == self.pid else ([], [])  # (a child's: forgotten)
        for spare in spares:
            spare.close()


def nobody():
    try:
        import pwd

        return pwd.getpwnam("nobody")[2:4]
    except (ImportError, KeyError):
        return 65534, 65534


POOL = WarmPool()


def run_python(code, tests=(), timeout=5.0, memory_mb=1024):
    """Run `code` (then each of `tests`, Python statements) in the sandbox; returns within about `timeout` s."""
    uid, gid = nobody()
    nonce = secrets.token_hex(16)
    # CPU seconds stop a busy loop whatever the load (SIGXCPU at the soft limit); the wall clock, with room for the
    # interpreter's start, stops code that sleeps
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": [math.ceil(timeout), math.ceil(timeout) + 1],
              "RLIMIT_FSIZE": 1 << 20, "RLIMIT_NPROC": 0, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
    preload = [m for m in PRELOAD_IF_USED if m in code]  # (PRELOAD is imported before the call arrives)
    payload = json.dumps({"code": code, "tests": list(tests), "nonce": nonce, "limits": limits, "uid": uid,
                          "gid": gid, "preload": preload}).encode()
    interpreter = POOL.take()
    try:
        timed_out, lines, output = interpreter.run(payload, timeout + WALL_GRACE)
        returncode = interpreter.proc.returncode
    finally:
        interpreter.close()
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
