"""
Run the real C xenstored (Debian's Xen 4.17 build) for integration tests.

There is no Xen hypervisor on test machines, so xenstored cannot open its
hypervisor interfaces.  C{tests/support/shim/xsshim.c} is a small LD_PRELOAD
library that stands in for libxenctrl / libxenevtchn / libxengnttab and
redirects C{/proc/xen/xsd_port} and C{/proc/xen/xsd_kva} into a scratch
directory; with it the genuine daemon serves its Unix socket as dom0.

Typical use from a trial test::

    from tests.support.realxenstored import RealXenstored, requireRealXenstored

    class MyTests(unittest.TestCase):
        def setUp(self):
            requireRealXenstored(self)
            self.xenstored = RealXenstored(self.mktemp())
            self.xenstored.start()
            self.addCleanup(self.xenstored.stop)

        def test_something(self):
            subprocess.run(["xenstore-write", "/a", "b"],
                           env=self.xenstored.env(), check=True)

Observed behaviour of xenstored 4.17 under this harness:

  - The store lives in memory only.  A stop/start (L{RealXenstored.restart})
    gives an empty tree again (just C{/tool/xenstored}).  A live update
    (L{RealXenstored.liveUpdate}) keeps the tree, the pid and the socket.
  - SIGTERM kills the daemon at once (no handler); it leaves its socket file
    and pid file behind, so connecting afterwards fails with ECONNREFUSED.
  - SIGKILL (L{RealXenstored.kill}): accepted connections see EOF, ones still
    in the listen backlog see ECONNRESET, new ones get ECONNREFUSED.
  - Quotas apply to unprivileged domains only.  Socket clients are dom0, so
    200 watches, 1200 nodes, 15 open transactions, 4000-byte values and 6
    permission entries were all accepted on one socket connection, despite
    the defaults (watches 128, nodes 1000, transactions 10, node-size 2048,
    permissions 5).  Paths longer than path-max (2048) still give EINVAL.
  - Unknown command-line options are only warned about on stderr (the
    daemon runs anyway); an unknown C{-Q} quota name is fatal.
  - Setting a node's owner to a domain the (fake) hypervisor does not know
    fails with ENOENT; non-owner permissions for unknown domains are
    accepted.  Use L{RealXenstored.setExistingDomains} to make domains exist.
  - Error replies are C{XS_ERROR} with the errno name as payload, e.g. reading
    a missing node gives C{ENOENT}, a malformed path C{EINVAL}.
  - The trace file (C{-T}, optional here) records every request/reply and
    connection; xenstored's syslog messages go nowhere (no /dev/log); its
    stderr goes to C{<workdir>/xenstored.log}.
  - Root is not needed; the socket is mode 0600, so clients must run as the
    same user (or root).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "REQUIRE_ENV",
    "RealXenstored",
    "XenstoredError",
    "findShim",
    "findXenstoreControl",
    "findXenstored",
    "rawRequest",
    "requireRealXenstored",
    "unavailableReason",
]

#: Set to C{"1"} to turn "real xenstored unavailable" skips into failures.
REQUIRE_ENV = "XENDDEV_REQUIRE_REAL_XENSTORED"

#: Override the xenstored binary / prebuilt shim library.
XENSTORED_ENV = "XENDDEV_XENSTORED"
SHIM_LIBRARY_ENV = "XENDDEV_XSSHIM"

#: Environment variables understood by the shim (see xsshim.c).
SHIM_DIR_ENV = "XENDDEV_SHIM_DIR"
SHIM_PARENT_ENV = "XENDDEV_SHIM_PARENT_PID"

XENSTORED_CANDIDATES = ("/usr/lib/xen-4.17/bin/xenstored",)
XENSTORE_CONTROL_CANDIDATES = ("/usr/lib/xen-4.17/bin/xenstore-control",)
CLI_TOOLS = ("xenstore-read", "xenstore-write", "xenstore-ls")

# The shim binds VIRQs to port VIRQ_PORT_BASE + virq.
VIRQ_PORT_BASE = 4000
VIRQ_DOM_EXC = 3

# Wire protocol bits used by the readiness probe.
XS_DIRECTORY = 1
XS_ERROR = 16
_HEADER = struct.Struct("=IIII")  # type, req_id, tx_id, len (host order)

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

_SHIM_DIR = Path(__file__).resolve().parent / "shim"
_BUILD_SCRIPT = _SHIM_DIR / "build.sh"


class XenstoredError(RuntimeError):
    """
    The real xenstored could not be started, or misbehaved.
    """


def findXenstored() -> str | None:
    """
    Locate the C xenstored binary.

    @return: its path (C{$XENDDEV_XENSTORED} if set, else Debian's Xen 4.17
        location), or L{None} if it is not installed.
    """
    override = os.environ.get(XENSTORED_ENV)
    candidates = (override,) if override else XENSTORED_CANDIDATES
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def findXenstoreControl() -> str | None:
    """
    Locate the version-specific C{xenstore-control} (the one in C{/usr/bin}
    is a Debian wrapper that refuses to run without a hypervisor).

    @return: its path, or L{None}.
    """
    for path in XENSTORE_CONTROL_CANDIDATES:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@functools.cache
def _buildShim() -> tuple[str | None, str | None]:
    override = os.environ.get(SHIM_LIBRARY_ENV)
    if override:
        if os.path.isfile(override):
            return os.path.abspath(override), None
        return None, f"{SHIM_LIBRARY_ENV}={override} does not exist"
    if shutil.which("bash") is None:
        return None, "bash not found; cannot run the shim build script"
    try:
        result = subprocess.run(
            ["bash", str(_BUILD_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"building the xenstored shim failed: {e}"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        return None, f"building the xenstored shim failed (exit {result.returncode}): {detail}"
    lines = result.stdout.strip().splitlines()
    path = lines[-1] if lines else ""
    if not os.path.isfile(path):
        return None, f"shim build script did not produce a library ({path!r})"
    return path, None


def findShim(build: bool = True) -> str | None:
    """
    Locate the LD_PRELOAD shim, building it on first use.

    @param build: if false, only report an already built library.
    @return: path of C{xsshim.so}, or L{None} if it cannot be built (see
        L{unavailableReason} for why).
    """
    if not build:
        override = os.environ.get(SHIM_LIBRARY_ENV)
        path = override or str(_SHIM_DIR / "build" / "xsshim.so")
        return os.path.abspath(path) if os.path.isfile(path) else None
    return _buildShim()[0]


@functools.cache
def _computeUnavailableReason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the real xenstored harness needs Linux, not {sys.platform}"
    binary = findXenstored()
    if binary is None:
        where = os.environ.get(XENSTORED_ENV) or XENSTORED_CANDIDATES[0]
        return f"xenstored not found at {where} (install the Debian package xen-utils-4.17)"
    shim, whyNot = _buildShim()
    if shim is None:
        return whyNot
    # The only trustworthy check is to actually run it once.
    workdir = tempfile.mkdtemp(prefix="xenddev-xsprobe-")
    daemon = RealXenstored(workdir, shim=shim)
    try:
        daemon.start()
    except XenstoredError as e:
        return f"xenstored does not start under the shim here: {e}"
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return None


def unavailableReason() -> str | None:
    """
    Explain why a real xenstored cannot be run here.

    The first call builds the shim and starts/stops a daemon once; the
    answer is cached for the life of the process.

    @return: L{None} if L{RealXenstored} works on this machine, otherwise a
        human-readable reason (missing package, missing gcc, build failure,
        start-up failure).
    """
    return _computeUnavailableReason()


def requireRealXenstored(testcase: unittest.TestCase, cli: bool = False) -> None:
    """
    Skip C{testcase} unless a real xenstored can be run here.

    If the environment variable C{XENDDEV_REQUIRE_REAL_XENSTORED} is C{"1"}
    the test fails instead of being skipped (for CI machines that are
    supposed to have everything installed).

    @param testcase: the running test (call this from C{setUp} or the test).
    @param cli: also require the C{xenstore-read/write/ls} command-line tools.
    """
    reason = unavailableReason()
    if reason is None and cli:
        missing = [tool for tool in CLI_TOOLS if shutil.which(tool) is None]
        if missing:
            reason = (
                f"xenstore CLI tools not found: {', '.join(missing)} "
                f"(install the Debian package xenstore-utils)"
            )
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        testcase.fail(f"real xenstored required ({REQUIRE_ENV}=1): {reason}")
    raise unittest.SkipTest(reason)


def _recvExact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "xenstored hung up")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def rawRequest(
    socketPath: str,
    msgType: int,
    payload: bytes,
    txId: int = 0,
    timeout: float = 2.0,
) -> tuple[int, bytes]:
    """
    Send one request on a fresh connection and return the reply.

    Watch events that arrive before the reply are skipped.  This is a
    diagnostic helper, not a client library.

    @param socketPath: the daemon's Unix socket.
    @param msgType: the C{XS_*} message type number.
    @param payload: the request body (callers add the NUL terminators).
    @param txId: transaction id.
    @param timeout: seconds allowed for connect, send and receive together.
    @return: C{(replyType, replyPayload)}.
    @raise OSError: if the connection fails or times out.
    """
    requestId = 0x5A5A0000 | (os.getpid() & 0xFFFF)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socketPath)
        sock.sendall(_HEADER.pack(msgType, requestId, txId, len(payload)) + payload)
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            replyType, replyId, _, length = _HEADER.unpack(_recvExact(sock, _HEADER.size))
            body = _recvExact(sock, length)
            if replyId == requestId:
                return replyType, body


def _probe(socketPath: str, timeout: float) -> bool:
    """
    Is xenstored at C{socketPath} accepting connections and answering?
    """
    try:
        replyType, _ = rawRequest(socketPath, XS_DIRECTORY, b"/\0", timeout=timeout)
    except OSError:
        return False
    return replyType == XS_DIRECTORY


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class RealXenstored:
    """
    One real xenstored process running as dom0 without a hypervisor.

    Everything lives under C{workdir}: C{xenstored.log} (the daemon's
    stdout/stderr, appended across restarts, with a marker line per start),
    C{xenstored.pid} (its C{-F} pid file), C{xenstored.trace} (if C{trace}),
    C{shim/} (the shim's scratch files) and C{run/} (C{XENSTORED_RUNDIR},
    holding C{socket}).  If C{workdir} is too deep for a Unix socket path,
    C{run} is a symlink to a short private directory under C{/tmp}, which
    L{stop} removes.

    Several instances may run at once as long as their workdirs differ:
    xenstored 4.17 with its default in-memory database uses no other
    file-system paths (its syslog output is simply lost).
    """

    def __init__(
        self,
        workdir: str,
        shim: str | None = None,
        extraArgs: Sequence[str] = (),
        *,
        trace: bool = False,
        xenstored: str | None = None,
        domains: Iterable[int] = (0,),
        startTimeout: float = 10.0,
        dieWithParent: bool = True,
    ) -> None:
        """
        @param workdir: private directory for this instance (created if
            missing; relative paths are made absolute).
        @param shim: path of C{xsshim.so}; default L{findShim}().
        @param extraArgs: extra xenstored command-line arguments, e.g.
            C{["-Q", "memory=100000"]} or C{["-V"]}.
        @param trace: pass C{-T <workdir>/xenstored.trace} (slower, but logs
            every request and reply).
        @param xenstored: the daemon binary; default L{findXenstored}().
        @param domains: domain ids the fake hypervisor reports as existing.
        @param startTimeout: seconds L{start} waits for the first reply.
        @param dieWithParent: have the daemon killed when the process (more
            exactly: the thread) that started it dies.
        """
        self._workdir = os.path.abspath(workdir)
        self._shim = shim
        self._extraArgs = tuple(extraArgs)
        self._trace = trace
        self._xenstored = xenstored
        self._startTimeout = startTimeout
        self._dieWithParent = dieWithParent
        self._proc: subprocess.Popen[bytes] | None = None
        self._startCount = 0
        self._shortRundir: str | None = None

        os.makedirs(self._workdir, exist_ok=True)
        os.makedirs(self.shimDir, exist_ok=True)
        self._rundir = self._chooseRundir()
        self.setExistingDomains(domains)

    def __repr__(self) -> str:
        return f"<RealXenstored pid={self.pid} socket={self.socketPath!r}>"

    def __enter__(self) -> RealXenstored:
        self.start()
        return self

    def __exit__(self, *excInfo: object) -> None:
        self.stop()

    # -- paths --------------------------------------------------------

    def _chooseRundir(self) -> str:
        inTree = os.path.join(self._workdir, "run")
        if len(os.fsencode(os.path.join(inTree, "socket"))) <= _MAX_SOCKET_PATH:
            os.makedirs(inTree, exist_ok=True)
            return inTree
        base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
        self._shortRundir = tempfile.mkdtemp(prefix="realxsd-", dir=base)
        if not os.path.lexists(inTree):
            os.symlink(self._shortRundir, inTree)
        return self._shortRundir

    @property
    def workdir(self) -> str:
        """
        The absolute working directory of this instance.
        """
        return self._workdir

    @property
    def rundir(self) -> str:
        """
        The daemon's C{XENSTORED_RUNDIR} (directory holding the socket).
        """
        return self._rundir

    @property
    def socketPath(self) -> str:
        """
        The Unix socket xenstored serves (stable across L{restart}).
        """
        return os.path.join(self._rundir, "socket")

    @property
    def shimDir(self) -> str:
        """
        The shim's scratch directory (C{XENDDEV_SHIM_DIR}).
        """
        return os.path.join(self._workdir, "shim")

    @property
    def logPath(self) -> str:
        """
        File receiving the daemon's stdout and stderr.
        """
        return os.path.join(self._workdir, "xenstored.log")

    @property
    def tracePath(self) -> str | None:
        """
        The C{-T} trace file, or L{None} if tracing is off.
        """
        if not self._trace:
            return None
        return os.path.join(self._workdir, "xenstored.trace")

    @property
    def pidfilePath(self) -> str:
        """
        The daemon's C{-F} pid file.
        """
        return os.path.join(self._workdir, "xenstored.pid")

    @property
    def pid(self) -> int | None:
        """
        The daemon's pid while it runs, else L{None}.
        """
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def startCount(self) -> int:
        """
        How many times the daemon has been started (restarts included).
        """
        return self._startCount

    def isRunning(self) -> bool:
        """
        @return: whether the daemon process is alive (not whether it
            answers; see L{isResponsive}).
        """
        return self.pid is not None

    def isResponsive(self, timeout: float = 1.0) -> bool:
        """
        @return: whether the socket accepts a connection and answers a
            C{DIRECTORY /} request within C{timeout} seconds.
        """
        return _probe(self.socketPath, timeout)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """
        Environment for the C{xenstore-*} command-line tools (or anything
        using libxenstore) so that they talk to this daemon.

        @param base: starting environment; default C{os.environ}.
        @return: a new dict with C{XENSTORED_PATH} (and C{XENSTORED_RUNDIR})
            pointing here.
        """
        result = dict(os.environ if base is None else base)
        result["XENSTORED_PATH"] = self.socketPath
        result["XENSTORED_RUNDIR"] = self._rundir
        return result

    def logTail(self, limit: int = 4000) -> str:
        """
        @return: the last C{limit} bytes of the daemon's log and, if tracing,
            of its trace file.
        """
        text = _tail(self.logPath, limit)
        if self.tracePath is not None:
            trace = _tail(self.tracePath, limit)
            if trace:
                text += f"\n--- trace ({self.tracePath}) ---\n{trace}"
        return text

    # -- fake hypervisor controls -------------------------------------

    def setExistingDomains(self, domids: Iterable[int]) -> None:
        """
        Set which domain ids the fake hypervisor reports as existing.

        xenstored asks when permissions name a domain (an unknown owner
        gives ENOENT) and when it re-checks domains after
        L{fireDomainException}.  Domain 0 should normally stay in the list.
        """
        text = " ".join(str(int(d)) for d in domids) + "\n"
        path = os.path.join(self.shimDir, "domains")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def fireDomainException(self) -> None:
        """
        Raise VIRQ_DOM_EXC in the daemon, as Xen does when a domain dies:
        xenstored then drops introduced domains that no longer exist (see
        L{setExistingDomains}) and fires C{@releaseDomain}.
        """
        self._notifyPort(VIRQ_PORT_BASE + VIRQ_DOM_EXC)

    def _notifyPort(self, port: int) -> None:
        if not self.isRunning():
            raise XenstoredError("xenstored is not running")
        fifo = os.path.join(self.shimDir, "evtchn")
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, struct.pack("=I", port))
        finally:
            os.close(fd)

    # -- life cycle ---------------------------------------------------

    def _command(self, binary: str) -> list[str]:
        args = [binary, "-N", "-F", self.pidfilePath]
        if self.tracePath is not None:
            args += ["-T", self.tracePath]
        args += list(self._extraArgs)
        return args

    def _daemonEnv(self, shim: str) -> dict[str, str]:
        env = dict(os.environ)
        preload = env.get("LD_PRELOAD")
        env["LD_PRELOAD"] = f"{shim} {preload}" if preload else shim
        env["XENSTORED_RUNDIR"] = self._rundir
        env["XENSTORED_PATH"] = self.socketPath
        env["XENSTORED_ROOTDIR"] = os.path.join(self._workdir, "lib")
        env[SHIM_DIR_ENV] = self.shimDir
        if self._dieWithParent:
            env[SHIM_PARENT_ENV] = str(os.getpid())
        else:
            env.pop(SHIM_PARENT_ENV, None)
        return env

    def _resetScratch(self) -> None:
        """
        Give a freshly started daemon clean ring pages and port files (the
        C{domains} list is kept).
        """
        os.makedirs(self._rundir, exist_ok=True)
        os.makedirs(os.path.join(self._workdir, "lib"), exist_ok=True)
        for name in os.listdir(self.shimDir):
            if name in ("xsd_kva", "xsd_port", "evtchn") or name.startswith(("ring-", "port-")):
                os.unlink(os.path.join(self.shimDir, name))
        try:
            os.unlink(self.socketPath)
        except FileNotFoundError:
            pass

    def start(self) -> None:
        """
        Start xenstored and wait until it answers a request.

        @raise XenstoredError: if it is already running, cannot be found,
            exits, or does not answer within C{startTimeout} seconds; the
            message includes the tail of its log.
        """
        if self.isRunning():
            raise XenstoredError(f"xenstored already running (pid {self.pid})")
        binary = self._xenstored or findXenstored()
        if binary is None:
            raise XenstoredError("xenstored not found (install xen-utils-4.17)")
        shim = self._shim or findShim()
        if shim is None:
            raise XenstoredError(f"xenstored shim unavailable: {unavailableReason()}")
        if self._shortRundir is not None:
            os.makedirs(self._shortRundir, mode=0o700, exist_ok=True)
        self._resetScratch()
        self._startCount += 1
        args = self._command(binary)
        try:
            with open(self.logPath, "ab") as log:
                log.write(f"--- harness: start #{self._startCount}: {' '.join(args)}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._daemonEnv(shim),
                    cwd=self._workdir,
                    close_fds=True,
                )
            self._waitUntilAnswering()
        except BaseException:
            self._terminate(signal.SIGKILL)
            self._removeShortRundir()
            raise

    def _waitUntilAnswering(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._startTimeout
        delay = 0.002
        while True:
            status = proc.poll()
            if status is not None:
                self._proc = None
                raise XenstoredError(
                    f"xenstored exited with status {status} during start-up "
                    f"(log {self.logPath}):\n{self.logTail()}"
                )
            remaining = deadline - time.monotonic()
            if _probe(self.socketPath, max(0.05, min(1.0, remaining))):
                return
            if time.monotonic() >= deadline:
                self._terminate(signal.SIGKILL)
                raise XenstoredError(
                    f"xenstored did not answer on {self.socketPath} within "
                    f"{self._startTimeout:g}s (log {self.logPath}):\n"
                    f"{self.logTail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _terminate(self, sig: int, grace: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def stop(self) -> None:
        """
        Stop the daemon (SIGTERM, then SIGKILL after 5 s) and reap it.

        Idempotent; also fine after L{kill} or a crash.  Removes the short
        out-of-tree run directory, if one was needed.
        """
        self._terminate(signal.SIGTERM)
        self._removeShortRundir()

    def _removeShortRundir(self) -> None:
        if self._shortRundir is not None:
            shutil.rmtree(self._shortRundir, ignore_errors=True)

    def kill(self) -> None:
        """
        SIGKILL the daemon immediately and reap it (for fault tests).

        The socket file stays behind, so new connections fail with
        ECONNREFUSED; existing connections see EOF.
        """
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """
        Stop and start the daemon on the same socket path.

        The new daemon starts with an empty store (only C{/tool/xenstored});
        clients must reconnect.  Use L{liveUpdate} to keep the tree.
        """
        self._terminate(signal.SIGTERM)
        self.start()

    def liveUpdate(self, timeout: float = 30.0) -> None:
        """
        Live-update the daemon to the same binary (C{xenstore-control
        live-update}): it re-executes itself, keeping its pid, socket,
        store contents, watches and connections.

        @raise XenstoredError: if C{xenstore-control} is missing or the
            daemon is not alive and answering afterwards.
        """
        if not self.isRunning():
            raise XenstoredError("xenstored is not running")
        control = findXenstoreControl()
        if control is None:
            raise XenstoredError("xenstore-control not found")
        binary = self._xenstored or findXenstored()
        assert binary is not None
        try:
            result = subprocess.run(
                [control, "live-update", binary],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise XenstoredError(f"live update timed out: {e}") from e
        deadline = time.monotonic() + self._startTimeout
        while time.monotonic() < deadline:
            if not self.isRunning():
                break
            if self.isResponsive(0.5):
                return
            time.sleep(0.01)
        raise XenstoredError(
            f"live update failed (xenstore-control exit {result.returncode}: "
            f"{(result.stdout + result.stderr).strip()}):\n{self.logTail()}"
        )
