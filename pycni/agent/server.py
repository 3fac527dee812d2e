"""The agent: serves CNI requests from the plugin shims over a root-only unix socket.

One thread accepts; each connection gets a thread that checks the peer
(SO_PEERCRED: uid 0 only), reads the request, waits for one of
``max_concurrency`` slots (at most ``queue_timeout``: then "try again later",
code 11), accepts it and runs ``skel.dispatch`` on a worker thread that first
enters the caller's network namespace (the descriptor the shim passed) and
always comes back. A request that outlives ``request_timeout`` is answered
with code 11; its worker keeps its slot until it really ends (a thread cannot
be killed), so a hung plugin cannot make the agent take on more work than it
was told to. STATUS and VERSION skip the queue.

Nothing a request carries reaches another: each gets its own environment
(the agent's own minus CNI_* / PYCNI_*, then the caller's CNI_* / PYCNI_*),
its own diagnostics (in its Outcome) and its own thread.

Stopping (``stop()``, SIGTERM in the command): stop accepting, remove the
socket file (if it is still ours), let queued requests go (closed before
being accepted: their shims run them in-process), and wait up to ``grace``
seconds for accepted ones to finish.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .stats import Stats

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_FD = struct.Struct("i")
_MAX_FDS = 4


@dataclass
class AgentOptions:
    socket_path: str = protocol.DEFAULT_SOCKET
    max_concurrency: int = 16
    queue_timeout: float = 10.0     # longest wait for a free slot before "try again later"
    request_timeout: float = 60.0   # longest a request may run before "try again later"
    grace: float = 30.0             # how long a stopping agent lets accepted requests finish
    read_timeout: float = 10.0      # longest a connected peer may take to send its request
    warm_up: bool = True            # import every plugin before serving
    profile_dir: str = ""           # write a cProfile of every request's work here (diagnosis only)


class AgentError(Exception):
    """The agent cannot start (socket directory unsafe, another agent running, ...)."""


class _Slots:
    """Counting semaphore whose waiters give up when the agent starts draining."""

    def __init__(self, size: int) -> None:
        self._cond = threading.Condition()
        self._free = size
        self.waiting = 0
        self.draining = False

    def acquire(self, timeout: float) -> bool | None:
        """True: got a slot; False: timed out; None: the agent is draining."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.waiting += 1
            try:
                while True:
                    if self.draining:
                        return None
                    if self._free > 0:
                        self._free -= 1
                        return True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self.waiting -= 1

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def drain(self) -> None:
        with self._cond:
            self.draining = True
            self._cond.notify_all()


class Agent:
    """A CNI request server; ``start()``, ``serve_forever()`` (until ``stop()``), ``close()``."""

    def __init__(self, options: AgentOptions, log: logging.Logger | None = None,
                 extra_status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.options = options
        self.log = log or logging.getLogger("pycni.agent")
        self.extra_status = extra_status
        self.stats = Stats()
        self.version = protocol.pycni_version()
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._slots = _Slots(options.max_concurrency)
        self._in_flight = 0
        self._in_flight_cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._socket_id: tuple[int, int] | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = threading.Event()
        self._ids = 0
        self._ids_lock = threading.Lock()
        self._base_environ = {k: v for k, v in os.environ.items() if not k.startswith(protocol.FORWARDED_PREFIXES)}
        self._base_environ[protocol.NO_AGENT_VARIABLE] = "1"

    # ---- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Warm the plugins up and listen on the socket (raises AgentError)."""
        # Plugins this process executes (a delegated IPAM shim) must not call back into the agent.
        os.environ[protocol.NO_AGENT_VARIABLE] = "1"
        if self.options.warm_up:
            warm_up(self.log)
        self._listen()
        self.log.info("pycni agent %s serving on %s (pid %d, max %d concurrent requests, timeout %g s)",
                      self.version, self.options.socket_path, os.getpid(), self.options.max_concurrency,
                      self.options.request_timeout)

    def _listen(self) -> None:
        path = os.path.abspath(self.options.socket_path)
        directory = os.path.dirname(path)
        _prepare_directory(directory)
        self._lock_fd = _take_lock(path + ".lock")
        try:
            os.unlink(path)  # a stale socket of an agent that did not stop cleanly: we hold the lock
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise AgentError(f"cannot remove the stale socket {path}: {exc.strerror}") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            # Connecting needs write permission on the socket file: with the usual umask nobody else
            # has it even before this chmod (and the directory may already be root's only).
            os.chmod(path, 0o600)
        except OSError as exc:
            listener.close()
            raise AgentError(f"cannot listen on {path}: {exc.strerror}") from None
        st = os.stat(path)
        self._socket_id = (st.st_dev, st.st_ino)
        listener.listen(max(128, self.options.max_concurrency * 8))
        listener.setblocking(False)
        self._listener = listener

    def serve_forever(self) -> None:
        """Accept connections until ``stop()``; then stop listening and drain (up to ``grace``)."""
        assert self._listener is not None, "start() first"
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping.is_set():
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        continue
                    self._accept_ready()
        finally:
            self._stop_listening()
            self._drain()

    def _accept_ready(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.error("cannot accept a connection: %s; pausing briefly", exc.strerror)
                    time.sleep(0.1)
                    return
                raise
            conn.setblocking(True)
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name="pycni-agent-conn").start()

    def stop(self) -> None:
        """Ask ``serve_forever`` to stop (safe from a signal handler or another thread)."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        path = os.path.abspath(self.options.socket_path)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(path)  # only our own: a newer agent may already serve this path
        except OSError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # a new agent may start while this one drains
            self._lock_fd = None
        self._slots.drain()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.options.grace
        with self._in_flight_cond:
            if self._in_flight:
                self.log.info("stopping: waiting up to %g s for %d request(s) in flight",
                              self.options.grace, self._in_flight)
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.log.warning("stopping with %d request(s) still running after the %g s grace period; "
                                     "their callers get 'try again later'", self._in_flight, self.options.grace)
                    break
                self._in_flight_cond.wait(left)
        self.log.info("pycni agent stopped")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- one connection --------------------------------------------------------------

    def _next_id(self) -> int:
        with self._ids_lock:
            self._ids += 1
            return self._ids

    def _serve_connection(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                conn.settimeout(self.options.read_timeout)
                pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               _PEERCRED.size))
                if uid != 0:
                    self.stats.count("denied")
                    self.log.warning("refused a connection from pid %d uid %d: the agent serves root only", pid, uid)
                    _send(conn, protocol.answer(protocol.REFUSED, b"permission denied: the agent serves root only"))
                    _hang_up(conn)
                    return
                try:
                    body, fds = _read_request(conn)
                    version, kind, plugin_type, env_block, stdin = protocol.split_fields(body,
                                                                                        protocol.REQUEST_FIELDS)
                except (protocol.ProtocolError, EOFError, OSError) as exc:
                    self.stats.count("bad_requests")
                    self.log.warning("dropped a malformed request from pid %d: %s", pid, exc)
                    return
                if kind == protocol.KIND_STATUS:
                    _send(conn, protocol.answer(protocol.STATUS, json.dumps(self.status(), default=str).encode()))
                    return
                refusal = self._refusal(version, kind, plugin_type, fds) or _netns_view_differs(env_block, fds[1:])
                if refusal:
                    self.stats.count("refused")
                    self.log.info("refused a request from pid %d: %s", pid, refusal)
                    _send(conn, protocol.answer(protocol.REFUSED, refusal.encode()))
                    return
                self._serve_cni(conn, pid, plugin_type.decode(), env_block, stdin, fds.pop(0))
        except Exception:  # never let one connection take the agent down
            self.log.exception("unexpected failure serving a connection")
        finally:
            for fd in fds:
                os.close(fd)

    def _refusal(self, version: bytes, kind: bytes, plugin_type: bytes, fds: list[int]) -> str:
        from cni_plugins.spec.registry import PACKAGES

        if version.decode(errors="replace") != self.version:
            return (f"version mismatch: the shim is pycni {version.decode(errors='replace')}, "
                    f"the agent pycni {self.version}")
        if kind != protocol.KIND_CNI:
            return f"unknown request kind {kind.decode(errors='replace')!r}"
        if plugin_type.decode(errors="replace") not in PACKAGES:
            return f"the agent has no plugin {plugin_type.decode(errors='replace')!r}"
        if len(fds) not in (1, 2):
            return "the request did not carry the caller's network namespace"
        return ""

    def _serve_cni(self, conn: socket.socket, pid: int, plugin_type: str, env_block: bytes, stdin: bytes,
                   ns_fd: int) -> None:
        received = time.monotonic()
        try:
            caller_environ = protocol.parse_environ(env_block)
        except protocol.ProtocolError as exc:
            os.close(ns_fd)
            self.stats.count("bad_requests")
            self.log.warning("dropped a request from pid %d: %s", pid, exc)
            return
        environ = dict(self._base_environ)
        environ.update({k: v for k, v in caller_environ.items() if k.startswith(protocol.FORWARDED_PREFIXES)})
        command = environ.get("CNI_COMMAND", "")
        cni_version = _config_version(stdin)
        rid = self._next_id()
        what = (f"#{rid} {plugin_type} {command or '-'} container={environ.get('CNI_CONTAINERID', '-')} "
                f"ifname={environ.get('CNI_IFNAME', '-')} pid={pid}")
        queued = command not in ("STATUS", "VERSION")
        if queued:
            got = self._slots.acquire(self.options.queue_timeout)
            if got is None:  # stopping: not accepted, the shim runs it in-process
                os.close(ns_fd)
                self.log.info("%s: not accepted, the agent is stopping", what)
                return
            if not got:
                os.close(ns_fd)
                self.stats.count("busy")
                self.log.warning("%s: no free slot within %g s (%d running); answered 'try again later'",
                                 what, self.options.queue_timeout, self.options.max_concurrency)
                _send(conn, _try_again(cni_version, "the pycni agent is busy",
                                       f"no free slot within {self.options.queue_timeout:g} s; try again later"))
                return
        job = _Job(plugin_type, environ, stdin, ns_fd)
        with self._in_flight_cond:
            self._in_flight += 1
        try:
            try:
                _send(conn, protocol.answer(protocol.ACCEPTED, repr(self.options.request_timeout).encode(),
                                            json.dumps(cni_version).encode()))
            except OSError as exc:  # the caller is gone before the work started: do nothing
                self.log.info("%s: caller went away before the request was accepted (%s)", what, exc)
                os.close(ns_fd)
                if queued:
                    self._slots.release()
                return
            worker = threading.Thread(target=self._work, args=(job, what, queued, received), daemon=True,
                                      name=f"pycni-agent-req{rid}")
            try:
                worker.start()
            except RuntimeError as exc:  # cannot start a thread (resource limits): nothing ran
                os.close(ns_fd)
                if queued:
                    self._slots.release()
                self.log.error("%s: cannot start a worker: %s", what, exc)
                _send(conn, _try_again(cni_version, "the pycni agent cannot take the request now",
                                       f"{exc}; try again later"))
                return
            if not job.done.wait(self.options.request_timeout):
                job.abandoned = True
                self.stats.count("timed_out")
                self.log.error("%s: no result within %g s; answered 'try again later' (the work goes on "
                               "in the background and keeps its slot)", what, self.options.request_timeout)
                _send(conn, _try_again(cni_version, "the pycni agent timed out serving the request",
                                       f"{plugin_type} {command} took longer than "
                                       f"{self.options.request_timeout:g} s; try again later"))
                return
            assert job.answer is not None
            try:
                _send(conn, job.answer)
            except OSError as exc:
                self.log.warning("%s: finished, but the caller went away before the answer (%s)", what, exc)
        finally:
            with self._in_flight_cond:
                self._in_flight -= 1
                self._in_flight_cond.notify_all()

    def _work(self, job: _Job, what: str, queued: bool, received: float) -> None:
        from cni_plugins.spec import registry
        from cni_plugins.spec.skel import dispatch

        from .shim import render

        code = 1
        try:
            try:
                def serve() -> Any:
                    return dispatch(registry.funcs(job.plugin_type), job.environ, job.stdin)

                if self.options.profile_dir:
                    outcome = self._profiled(what, lambda: _in_namespace(job.ns_fd, serve))
                else:
                    outcome = _in_namespace(job.ns_fd, serve)
                code, stdout, stderr = render(outcome)
            except BaseException as exc:  # entering the namespace failed, or a plugin called sys.exit
                self.log.error("%s: %s: %s", what, type(exc).__name__, exc)
                from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

                code, stdout, stderr = 1, (CNIError(ERR_INTERNAL, f"pycni agent: {exc}").to_json(
                    _config_version(job.stdin)) + "\n").encode(), b""
            job.answer = protocol.answer(protocol.DONE, str(code).encode(), stdout, stderr)
        finally:
            os.close(job.ns_fd)
            if queued:
                self._slots.release()
            elapsed = time.monotonic() - received
            command = job.environ.get("CNI_COMMAND", "")
            self.stats.served(job.plugin_type, command, elapsed, code == 0)
            # Every failure is worth a line; successes only at debug level (a busy node serves many).
            level = logging.DEBUG if code == 0 and not job.abandoned else logging.WARNING
            suffix = " (after its caller was told to try again)" if job.abandoned else ""
            self.log.log(level, "%s: exit %d in %.1f ms%s", what, code, elapsed * 1000, suffix)
            job.done.set()

    def _profiled(self, what: str, fn: Callable[[], Any]) -> Any:
        import cProfile

        profile = cProfile.Profile()
        try:
            return profile.runcall(fn)
        finally:
            name = "-".join(what.split()[:3]).lstrip("#") + ".prof"
            profile.dump_stats(os.path.join(self.options.profile_dir, name))

    # ---- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        with self._in_flight_cond:
            in_flight = self._in_flight
        out: dict[str, Any] = {
            "alive": True,
            "pid": os.getpid(),
            "version": self.version,
            "socket": os.path.abspath(self.options.socket_path),
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "stopping": self.stopping,
            "max_concurrency": self.options.max_concurrency,
            "request_timeout_s": self.options.request_timeout,
            "queue_timeout_s": self.options.queue_timeout,
            "in_flight": in_flight,
            "queued": self._slots.waiting,
            "cpu_s": _cpu_seconds(),
            **snapshot,
        }
        if self.extra_status is not None:
            try:
                out.update(self.extra_status())
            except Exception as exc:  # status must answer even when a part of it cannot
                out["extra_status_error"] = str(exc)
        return out


def _cpu_seconds() -> dict[str, float]:
    """CPU used so far by the agent (all its threads) and by the tools it ran and reaped (nft, tc, ...)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self": round(own.ru_utime + own.ru_stime, 6),
            "children": round(children.ru_utime + children.ru_stime, 6)}


class _Job:
    __slots__ = ("plugin_type", "environ", "stdin", "ns_fd", "answer", "done", "abandoned")

    def __init__(self, plugin_type: str, environ: dict[str, str], stdin: bytes, ns_fd: int) -> None:
        self.plugin_type = plugin_type
        self.environ = environ
        self.stdin = stdin
        self.ns_fd = ns_fd
        self.answer: bytes | None = None
        self.done = threading.Event()
        self.abandoned = False


def _in_namespace(fd: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` with this thread in the network namespace open as ``fd``; back afterwards."""
    import netns

    with netns.enter(f"/proc/self/fd/{fd}"):
        return fn()


def _netns_view_differs(env_block: bytes, fds: list[int]) -> str:
    """Why this agent must not serve the request, if CNI_NETNS names another namespace here than for the caller.

    A shim sends, besides its own network namespace, what CNI_NETNS is for it
    (an O_PATH descriptor). A caller in another mount namespace (a runtime with
    private /run/netns, a test harness) may see a different namespace, or none,
    at that path; the agent opens paths in its own. Then the request is
    refused before anything runs, and the shim runs the plugin in-process
    where the path means what the caller meant.
    """
    if not fds:
        return ""  # the caller could not open CNI_NETNS either: the plugin reports that as it always does
    try:
        path = protocol.parse_environ(env_block).get("CNI_NETNS", "")
        theirs = os.fstat(fds[0])
    except (protocol.ProtocolError, OSError):
        return ""  # the request is served and fails the way it would anyway
    try:
        ours = os.stat(path) if path else None
    except OSError:
        ours = None
    if ours is not None and (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino):
        return ""
    return (f"CNI_NETNS {path} is another namespace for the agent than for the caller (another mount "
            f"namespace)")


def _read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request body and the descriptors that came with it (the caller closes them)."""
    fds: list[int] = []
    head = b""
    try:
        while len(head) < 12:
            data, ancdata, flags, _ = conn.recvmsg(12 - len(head), socket.CMSG_SPACE(_MAX_FDS * _FD.size),
                                                   socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % _FD.size
                    fds.extend(_FD.unpack_from(payload, i)[0] for i in range(0, usable, _FD.size))
            if flags & socket.MSG_CTRUNC:
                raise protocol.ProtocolError("too many descriptors")
            if not data:
                raise EOFError("connection closed before a whole request")
            head += data
        if head[:8] != protocol.MAGIC:
            raise protocol.ProtocolError("not a pycni agent request (or another protocol version)")
        (size,) = struct.unpack(">I", head[8:12])
        if size > protocol.MAX_BODY:
            raise protocol.ProtocolError(f"request of {size} bytes is too large")
        return protocol.recv_exact(conn, size), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(data)


def _hang_up(conn: socket.socket, limit: int = 1 << 20, seconds: float = 1.0) -> None:
    """Close after an answer sent before the peer's request was read: read (and drop) what the peer
    still sends first, so that it can finish sending and read the answer instead of a reset."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(seconds)
        deadline = time.monotonic() + seconds
        while limit > 0 and time.monotonic() < deadline:
            chunk = conn.recv(min(limit, 65536))
            if not chunk:
                break
            limit -= len(chunk)
    except OSError:
        pass


def _config_version(stdin: bytes) -> str:
    """The configuration's cniVersion for an error object (what dispatch would use)."""
    from cni_plugins.spec.version import CURRENT_VERSION

    try:
        value = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return CURRENT_VERSION
    return value if isinstance(value, str) and value else CURRENT_VERSION


def _try_again(cni_version: str, msg: str, details: str) -> bytes:
    from cni_plugins.spec.errors import ERR_TRY_AGAIN, CNIError

    text = CNIError(ERR_TRY_AGAIN, msg, details).to_json(cni_version) + "\n"
    return protocol.answer(protocol.DONE, b"1", text.encode(), b"")


def _prepare_directory(directory: str) -> None:
    """The socket's directory: created 0700; an existing one must be root's and not writable by others."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=False)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise AgentError(f"cannot create the socket directory {directory}: {exc.strerror}") from None
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise AgentError(f"refusing to put the agent's socket in {directory}: it must belong to "
                         f"uid {os.geteuid()} and not be writable by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}); use a directory like /run/pycni")


def _take_lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentError(f"another pycni agent is serving {path[:-len('.lock')]} (it holds {path})") from None
    return fd


def warm_up(log: logging.Logger) -> None:
    """Import every plugin and what its commands import lazily, so the first requests are warm."""
    import importlib
    import pkgutil

    from cni_plugins.spec import registry

    started = time.monotonic()
    for plugin_type in registry.PACKAGES:
        try:
            funcs = registry.funcs(plugin_type)
            if funcs.module:
                importlib.import_module(funcs.module)
        except Exception as exc:
            log.warning("warm-up: cannot import plugin %s: %s", plugin_type, exc)
    for package_name in ("cni_plugins", "ipam"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + ".", onerror=lambda name: None):
            if info.name.endswith("__main__") or ".cluster" in info.name:
                continue
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                log.debug("warm-up: skipped %s: %s", info.name, exc)
    try:
        from cni_plugins.kernel.netlink import IPRoute

        with IPRoute() as ipr:  # loads pyroute2's lazily imported parts; reads nothing
            ipr.link("get", index=1)
    except Exception as exc:
        log.debug("warm-up: netlink: %s", exc)
    log.debug("warm-up took %.0f ms", (time.monotonic() - started) * 1000)


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: READY=1 / STOPPING=1 when run as a Type=notify unit."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError:
        pass
