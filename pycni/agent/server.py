"""The agent: serves CNI requests from the plugin shims over a root-only unix socket.

One thread accepts, up to ``max_connections`` connections at a time (one
more is answered "refused" at once, without reading it: its shim runs the
plugin in its own process); each connection gets a thread that checks the
peer (SO_PEERCRED: uid 0 only), reads the request within ``read_timeout``
(the whole request, however slowly it trickles in; a header announcing more
than 16 MiB is refused unread), checks what it carries, waits for one of
``max_concurrency`` slots (at most ``queue_timeout``: then "try again later",
code 11), accepts it and runs ``skel.dispatch`` on a worker thread that first
enters the caller's network namespace (the descriptor the shim passed) and
always comes back. A request that outlives ``request_timeout`` is answered
with code 11; its worker keeps its slot until it really ends (a thread cannot
be killed), so a hung plugin cannot make the agent take on more work than it
was told to. STATUS and VERSION skip the queue.

What crosses the socket is checked before anything runs, and refused
(answer ``R``: the shim then runs the request in-process, with the results
of a plugin the runtime started) when the agent must not serve it:

- namespaces come only as descriptors: the caller's own network namespace,
  and CNI_NETNS opened by the caller. The plugin code gets CNI_NETNS as a
  /proc path naming that descriptor, never the caller's path resolved in the
  agent's mount and pid namespaces; results and messages show the caller's
  path again. No usable descriptor for a non-empty CNI_NETNS: refused.
- executables: a delegated plugin (IPAM) that is not pycni's own (served
  in-process) runs only from the directories the operator allowed
  (``cni_bin_dirs``, plus what `pycni install` recorded beside the socket).
  A configuration whose IPAM resolves elsewhere is refused before any work;
  if the work meets such an executable anyway, the plugin undoes what it did
  (``exec.ExecRefused`` passes through its undo) and the refusal follows.

Every descriptor a connection brings is closed on every path: the worker
owns them once it starts, the connection's thread otherwise.

Nothing a request carries reaches another: each gets its own environment
(the agent's own minus CNI_* / PYCNI_*, then the caller's CNI_* / PYCNI_*,
then the agent's PYCNI_AGENT_* settings for it), its own diagnostics (in
its Outcome) and its own thread.

Stopping (``stop()``, SIGTERM in the command): stop accepting, remove the
socket file (if it is still ours), let queued requests go (closed before
being accepted: their shims run them in-process), and wait up to ``grace``
seconds for accepted ones to finish.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
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
_RECORD_MAX = 64 * 1024
# Plugins that delegate to the IPAM plugin their configuration names: type -> the IPAM type when none is named.
_IPAM_DELEGATORS = {"bridge": "", "vxlan": "host-local"}
POLL_INTERVAL_MS = 500  # the accept loop's longest sleep: how late a SIGTERM delivered to another thread acts


@dataclass
class AgentOptions:
    socket_path: str = protocol.DEFAULT_SOCKET
    max_concurrency: int = 16
    max_connections: int = 256  # connections open at once; one more is refused at once (it runs cold)
    queue_timeout: float = 10.0  # longest wait for a free slot before "try again later"
    request_timeout: float = 60.0  # longest a request may run before "try again later"
    grace: float = 30.0  # how long a stopping agent lets accepted requests finish
    read_timeout: float = 10.0  # longest a connected peer may take to send its whole request
    # Where delegated executables may come from (with the directories `pycni install` recorded for the socket).
    cni_bin_dirs: tuple[str, ...] = (protocol.DEFAULT_CNI_BIN_DIR,)
    warm_up: bool = True  # import every plugin before serving
    profile_dir: str = ""  # write a cProfile of every request's work here (diagnosis only)


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

    def __init__(
        self,
        options: AgentOptions,
        log: logging.Logger | None = None,
        extra_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
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
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._turned_away_logged = 0.0
        # How this process is named under /proc (its pid as the /proc mount counts): descriptors a
        # request passed are /proc/<that>/fd/<n> for the plugin code and for what it executes.
        self._proc_self = os.readlink("/proc/self")
        self._record: tuple[tuple[int, int, int], tuple[str, ...]] | None = None
        self._unsafe_dirs_logged: set[tuple[str, str]] = set()

    # ---- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Warm the plugins up and listen on the socket (raises AgentError)."""
        # Plugins this process executes (a delegated IPAM shim) must not call back into the agent.
        os.environ[protocol.NO_AGENT_VARIABLE] = "1"
        if self.options.warm_up:
            warm_up(self.log)
        self._listen()
        self.log.info(
            "pycni agent %s serving on %s (pid %d, max %d concurrent requests, timeout %g s)",
            self.version,
            self.options.socket_path,
            os.getpid(),
            self.options.max_concurrency,
            self.options.request_timeout,
        )
        self.log.info("delegated plugins may be executed from: %s", ", ".join(self.allowed_dirs()) or "nowhere")
        problem = protocol.unsafe_socket(self.options.socket_path)
        if problem:
            self.log.warning(
                "the plugin shims will not use this socket (%s): they run every plugin in-process", problem
            )

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
        # Bound and listening under a private name first, then renamed into place: a client that finds the
        # socket can connect at once (never a refusal between bind and listen), and finds it root's only.
        staging = f"{path}.{os.getpid()}.new"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            listener.bind(staging)
            os.chmod(staging, 0o600)
            listener.listen(max(128, self.options.max_concurrency * 8))
            st = os.stat(staging)
            os.rename(staging, path)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise AgentError(f"cannot listen on {path}: {exc.strerror}") from None
        self._socket_id = (st.st_dev, st.st_ino)
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
                # Bounded: a signal delivered to another thread interrupts no syscall here, and its Python
                # handler (stop()) runs only once this thread runs Python code again.
                for fd, _ in poller.poll(POLL_INTERVAL_MS):
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
            with self._connections_lock:
                full = self._connections >= self.options.max_connections
                if not full:
                    self._connections += 1
            if full:
                self._turn_away(conn)
                continue
            conn.setblocking(True)
            try:
                threading.Thread(
                    target=self._serve_connection, args=(conn,), daemon=True, name="pycni-agent-conn"
                ).start()
            except RuntimeError as exc:  # no thread to serve it (resource limits): it runs cold
                self._connection_done()
                conn.close()
                self.log.error("cannot start a thread for a connection: %s", exc)

    def _turn_away(self, conn: socket.socket) -> None:
        """One connection too many: say so without reading it (nothing it sent is received) and close."""
        self.stats.count("over_capacity")
        try:
            conn.setblocking(False)
            conn.send(
                protocol.answer(protocol.REFUSED, f"busy: {self.options.max_connections} connections open".encode())
            )
        except OSError:
            pass
        finally:
            conn.close()
        now = time.monotonic()
        if now - self._turned_away_logged > 10:
            self._turned_away_logged = now
            self.log.warning(
                "%d connections open: refusing more (their shims run the plugins in-process); see --max-connections",
                self.options.max_connections,
            )

    def _connection_done(self) -> None:
        with self._connections_lock:
            self._connections -= 1

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

    @property
    def serving(self) -> bool:
        """Listening and not stopping: what /healthz answers 200 for without overlay mode."""
        return self._listener is not None and not self._stopping.is_set()

    def load(self) -> dict[str, int]:
        """What the agent is doing right now (cheap: no statistics are copied)."""
        with self._in_flight_cond:
            in_flight = self._in_flight
        return {"in_flight": in_flight, "queued": self._slots.waiting, "connections": self._connections}

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
                self.log.info(
                    "stopping: waiting up to %g s for %d request(s) in flight", self.options.grace, self._in_flight
                )
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.log.warning(
                        "stopping with %d request(s) still running after the %g s grace period; "
                        "their callers get 'try again later'",
                        self._in_flight,
                        self.options.grace,
                    )
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
        job: _Job | None = None
        try:
            with conn:
                deadline = time.monotonic() + self.options.read_timeout
                conn.settimeout(self.options.read_timeout)
                pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                if uid != 0:
                    self.stats.count("denied")
                    self.log.warning("refused a connection from pid %d uid %d: the agent serves root only", pid, uid)
                    _send(conn, protocol.answer(protocol.REFUSED, b"permission denied: the agent serves root only"))
                    _hang_up(conn)
                    return
                try:
                    body, fds = _read_request(conn, deadline)
                    version, kind, plugin_type, env_block, stdin = protocol.split_fields(body, protocol.REQUEST_FIELDS)
                except _NothingSent:
                    self.log.debug("pid %d hung up without a request", pid)
                    return
                except _Oversized as exc:
                    self.stats.count("refused")
                    self.log.warning("refused a request from pid %d: %s", pid, exc)
                    _send(conn, protocol.answer(protocol.REFUSED, _said(str(exc))))
                    _hang_up(conn)
                    return
                except (protocol.ProtocolError, EOFError, OSError) as exc:
                    self.stats.count("bad_requests")
                    self.log.warning("dropped a malformed request from pid %d: %s", pid, exc or type(exc).__name__)
                    return
                conn.settimeout(self.options.read_timeout)  # for the answers: a peer that does not read them
                if kind == protocol.KIND_STATUS:
                    _send(conn, protocol.answer(protocol.STATUS, json.dumps(self.status(), default=str).encode()))
                    return
                refusal = self._refusal(version, kind, plugin_type, fds)
                if refusal:
                    self.stats.count("refused")
                    self.log.info("refused a request from pid %d: %s", pid, refusal)
                    _send(conn, protocol.answer(protocol.REFUSED, _said(refusal)))
                    return
                try:
                    job = self._prepare(plugin_type.decode(), env_block, stdin, fds)
                except protocol.ProtocolError as exc:
                    self.stats.count("bad_requests")
                    self.log.warning("dropped a request from pid %d: %s", pid, exc)
                    return
                if job.refusal:
                    self.stats.count("declined")
                    self.log.info(
                        "refused a %s request from pid %d (it runs in the caller's process): %s",
                        job.plugin_type,
                        pid,
                        job.refusal,
                    )
                    _send(conn, protocol.answer(protocol.REFUSED, _said(job.refusal)))
                    return
                self._serve_cni(conn, pid, job)
        except Exception:  # never let one connection take the agent down
            self.log.exception("unexpected failure serving a connection")
        finally:
            if job is None or not job.started:  # once its worker runs, the worker closes them
                _close_all(fds)
            self._connection_done()

    def _refusal(self, version: bytes, kind: bytes, plugin_type: bytes, fds: list[int]) -> str:
        from cni_plugins.spec.registry import PACKAGES

        if version.decode(errors="replace") != self.version:
            return (
                f"version mismatch: the shim is pycni {version.decode(errors='replace')}, "
                f"the agent pycni {self.version}"
            )
        if kind != protocol.KIND_CNI:
            return f"unknown request kind {kind.decode(errors='replace')!r}"
        if plugin_type.decode(errors="replace") not in PACKAGES:
            return f"the agent has no plugin {plugin_type.decode(errors='replace')!r}"
        if len(fds) not in (1, 2):
            return "the request did not carry the caller's network namespace"
        return ""

    def _prepare(self, plugin_type: str, env_block: bytes, stdin: bytes, fds: list[int]) -> _Job:
        """The request as the worker runs it, or with ``refusal`` set: why the caller must run it itself.

        Nothing runs and nothing outside this process is touched here. A
        descriptor opened here goes into ``fds``, closed with the others.
        """
        caller_environ = protocol.parse_environ(env_block)  # ProtocolError: a malformed request
        environ = dict(self._base_environ)
        environ.update(
            {
                k: v
                for k, v in caller_environ.items()
                if k.startswith(protocol.FORWARDED_PREFIXES) and not k.startswith(protocol.AGENT_ONLY_PREFIX)
            }
        )
        conf = _load_conf(stdin)
        job = _Job(plugin_type, environ, stdin, fds, _conf_version(conf))
        problem = _netns_problem(fds[0])
        if problem:
            job.refusal = f"the caller's own network namespace descriptor is {problem}"
            return job
        path = environ.get("CNI_NETNS", "")
        if path:
            if len(fds) < 2:
                job.refusal = (
                    f"the caller could not open CNI_NETNS {path} (the agent never opens it "
                    f"itself: it may name another namespace here)"
                )
                return job
            netns_fd, problem = _reopen_netns(fds[1])
            if netns_fd is None:
                job.refusal = f"CNI_NETNS {path}: the descriptor the caller passed is {problem}"
                return job
            fds.append(netns_fd)
            job.netns = _NetnsName(caller=path, ours=f"/proc/{self._proc_self}/fd/{netns_fd}")
            environ["CNI_NETNS"] = job.netns.ours
            environ[_exec().AGENT_NETNS_VARIABLE] = path
            replaced = _exec().replace_sandbox(conf, path, job.netns.ours)
            if replaced is not None:
                job.stdin = json.dumps(replaced).encode()
        environ[_exec().AGENT_BIN_DIRS_VARIABLE] = ":".join(self.allowed_dirs())
        job.refusal = _delegate_refusal(plugin_type, environ, conf)
        return job

    def allowed_dirs(self) -> tuple[str, ...]:
        """Real paths of the directories delegated executables may come from, as of now.

        ``cni_bin_dirs`` and what `pycni install` recorded beside the socket;
        a directory someone else than root could write to is left out (with
        one warning), since executing from it would run what they put there.
        """
        out: list[str] = []
        for directory in (*self.options.cni_bin_dirs, *self._recorded_dirs()):
            real = os.path.realpath(directory)
            if real in out or not os.path.isdir(real):
                continue
            problem = protocol.unsafe_directory(real)
            if problem:
                if (real, problem) not in self._unsafe_dirs_logged:
                    self._unsafe_dirs_logged.add((real, problem))
                    self.log.warning("not executing plugins from %s: %s", real, problem)
                continue
            out.append(real)
        return tuple(out)

    def _recorded_dirs(self) -> tuple[str, ...]:
        """The directories `pycni install` recorded for this socket (read again when the file changes)."""
        path = protocol.bin_dirs_record(self.options.socket_path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return ()
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._record is not None and self._record[0] == key:
                return self._record[1]
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                dirs: tuple[str, ...] = ()
                self.log.warning("ignoring %s: it must be a file of root's that nobody else may write to", path)
            else:
                text = os.read(fd, _RECORD_MAX).decode("utf-8", "replace")
                dirs = tuple(
                    line.strip() for line in text.splitlines() if line.strip().startswith("/") and ":" not in line
                )
        except OSError:
            return ()
        finally:
            os.close(fd)
        self._record = (key, dirs)
        return dirs

    def _serve_cni(self, conn: socket.socket, pid: int, job: _Job) -> None:
        received = time.monotonic()
        environ, plugin_type, cni_version = job.environ, job.plugin_type, job.cni_version
        command = environ.get("CNI_COMMAND", "")
        rid = self._next_id()
        what = (
            f"#{rid} {plugin_type} {command or '-'} container={environ.get('CNI_CONTAINERID', '-')} "
            f"ifname={environ.get('CNI_IFNAME', '-')} pid={pid}"
        )
        queued = command not in ("STATUS", "VERSION")
        if queued:
            got = self._slots.acquire(self.options.queue_timeout)
            if got is None:  # stopping: not accepted, the shim runs it in-process
                self.log.info("%s: not accepted, the agent is stopping", what)
                return
            if not got:
                self.stats.count("busy")
                self.log.warning(
                    "%s: no free slot within %g s (%d running); answered 'try again later'",
                    what,
                    self.options.queue_timeout,
                    self.options.max_concurrency,
                )
                _send(
                    conn,
                    _try_again(
                        cni_version,
                        "the pycni agent is busy",
                        f"no free slot within {self.options.queue_timeout:g} s; try again later",
                    ),
                )
                return
        with self._in_flight_cond:
            self._in_flight += 1
        try:
            try:
                _send(
                    conn,
                    protocol.answer(
                        protocol.ACCEPTED, repr(self.options.request_timeout).encode(), json.dumps(cni_version).encode()
                    ),
                )
            except OSError as exc:  # the caller is gone before the work started: do nothing
                self.log.info("%s: caller went away before the request was accepted (%s)", what, exc)
                if queued:
                    self._slots.release()
                return
            worker = threading.Thread(
                target=self._work, args=(job, what, queued, received), daemon=True, name=f"pycni-agent-req{rid}"
            )
            try:
                worker.start()
            except RuntimeError as exc:  # cannot start a thread (resource limits): nothing ran
                if queued:
                    self._slots.release()
                self.log.error("%s: cannot start a worker: %s", what, exc)
                _send(
                    conn,
                    _try_again(cni_version, "the pycni agent cannot take the request now", f"{exc}; try again later"),
                )
                return
            job.started = True  # from here the worker owns (and closes) the request's descriptors
            if not job.done.wait(self.options.request_timeout):
                job.abandoned = True
                self.stats.count("timed_out")
                self.log.error(
                    "%s: no result within %g s; answered 'try again later' (the work goes on "
                    "in the background and keeps its slot)",
                    what,
                    self.options.request_timeout,
                )
                _send(
                    conn,
                    _try_again(
                        cni_version,
                        "the pycni agent timed out serving the request",
                        f"{plugin_type} {command} took longer than {self.options.request_timeout:g} s; try again later",
                    ),
                )
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
        from cni_plugins.spec.exec import ExecRefused
        from cni_plugins.spec.skel import dispatch

        from .shim import render

        code = 1
        refused = ""
        try:
            try:

                def serve() -> Any:
                    return dispatch(registry.funcs(job.plugin_type), job.environ, job.stdin)

                if self.options.profile_dir:
                    outcome = self._profiled(what, lambda: _in_namespace(job.fds[0], serve))
                else:
                    outcome = _in_namespace(job.fds[0], serve)
                code, stdout, stderr = render(outcome)
                if job.netns is not None:
                    stdout, stderr = job.netns.shown(stdout, stderr)
                job.answer = protocol.answer(protocol.DONE, str(code).encode(), stdout, stderr)
            except ExecRefused as exc:  # the plugin has undone its work: the caller runs the request itself
                refused = str(exc) or "the request needs an executable the agent may not run"
                if job.netns is not None:
                    refused = job.netns.shown(refused.encode(), b"")[0].decode("utf-8", "replace")
                job.answer = protocol.answer(protocol.REFUSED, _said(refused))
            except BaseException as exc:  # entering the namespace failed, or a plugin called sys.exit
                self.log.error("%s: %s: %s", what, type(exc).__name__, exc)
                from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

                code, stdout, stderr = (
                    1,
                    (CNIError(ERR_INTERNAL, f"pycni agent: {exc}").to_json(job.cni_version) + "\n").encode(),
                    b"",
                )
                job.answer = protocol.answer(protocol.DONE, str(code).encode(), stdout, stderr)
        finally:
            _close_all(job.fds)
            if queued:
                self._slots.release()
            elapsed = time.monotonic() - received
            command = job.environ.get("CNI_COMMAND", "")
            suffix = " (after its caller was told to try again)" if job.abandoned else ""
            if refused:
                self.stats.count("declined")
                self.log.info(
                    "%s: refused part-way, its work undone (it runs in the caller's process): %s%s",
                    what,
                    refused,
                    suffix,
                )
            else:
                self.stats.served(job.plugin_type, command, elapsed, code == 0)
                # Every failure is worth a line; successes only at debug level (a busy node serves many).
                level = logging.DEBUG if code == 0 and not job.abandoned else logging.WARNING
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
            "max_connections": self.options.max_connections,
            "connections": self._connections,
            "cni_bin_dirs": list(self.allowed_dirs()),
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
    return {"self": round(own.ru_utime + own.ru_stime, 6), "children": round(children.ru_utime + children.ru_stime, 6)}


class _NetnsName:
    """CNI_NETNS two ways: as the caller gave it, and as the /proc path of the descriptor it passed."""

    __slots__ = ("caller", "ours", "_ours_re", "_in_json")

    def __init__(self, caller: str, ours: str) -> None:
        self.caller = caller
        self.ours = ours
        self._ours_re = re.compile(re.escape(ours.encode()) + rb"(?![0-9])")
        self._in_json = json.dumps(caller)[1:-1].encode()

    def shown(self, stdout: bytes, stderr: bytes) -> tuple[bytes, bytes]:
        """The output as the caller would see it from a plugin process: its own CNI_NETNS path."""
        return (
            self._ours_re.sub(lambda _: self._in_json, stdout),
            self._ours_re.sub(lambda _: self.caller.encode("utf-8", "surrogateescape"), stderr),
        )


class _Job:
    """One request: what the worker runs, and the descriptors it owns once it has started."""

    __slots__ = (
        "plugin_type",
        "environ",
        "stdin",
        "fds",
        "cni_version",
        "netns",
        "refusal",
        "answer",
        "done",
        "abandoned",
        "started",
    )

    def __init__(
        self, plugin_type: str, environ: dict[str, str], stdin: bytes, fds: list[int], cni_version: str
    ) -> None:
        self.plugin_type = plugin_type
        self.environ = environ
        self.stdin = stdin
        self.fds = fds  # [the caller's own namespace, (its CNI_NETNS O_PATH, reopened)]
        self.cni_version = cni_version
        self.netns: _NetnsName | None = None
        self.refusal = ""
        self.answer: bytes | None = None
        self.done = threading.Event()
        self.abandoned = False
        self.started = False


def _exec() -> Any:
    from cni_plugins.spec import exec as exec_module

    return exec_module


def _said(text: str) -> bytes:
    """A message for the caller as UTF-8. It may quote the request (a CNI_NETNS or CNI_IFNAME that was not valid
    UTF-8 arrives as lone surrogates): those are written as backslash escapes instead of failing the answer."""
    return text.encode("utf-8", "backslashreplace")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _in_namespace(fd: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` with this thread in the network namespace open as ``fd``; back afterwards."""
    import netns

    with netns.enter(f"/proc/self/fd/{fd}"):
        return fn()


def _netns_problem(fd: int) -> str:
    """What the descriptor is, if not a network namespace ("" when it is one)."""
    from netns.check import namespace_type

    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # namespace files are regular files; never ioctl a device or a pipe
            return "not a network namespace"
        kind = namespace_type(fd)
    except OSError as exc:
        return f"unusable ({exc.strerror})"
    if kind == "net":
        return ""
    return f"a {kind} namespace, not a network namespace" if kind else "not a network namespace"


def _reopen_netns(fd: int) -> tuple[int | None, str]:
    """A readable descriptor of the namespace the caller passed opened O_PATH, or (None, what it is instead)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not a network namespace"
        # The caller's own descriptor, opened again (an O_PATH one cannot be setns'd or inspected); never its path.
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        return None, f"unusable ({exc.strerror})"
    problem = _netns_problem(reopened)
    if problem:
        os.close(reopened)
        return None, problem
    return reopened, ""


def _load_conf(stdin: bytes) -> dict[str, Any] | None:
    """The configuration as far as the agent looks into it before the plugin does (None: not a JSON object)."""
    try:
        conf = json.loads(stdin.decode("utf-8"))
    except (ValueError, RecursionError, MemoryError):  # the plugin reports it, as it would cold
        return None
    return conf if isinstance(conf, dict) else None


def _conf_version(conf: dict[str, Any] | None) -> str:
    """The configuration's cniVersion for an error object (what dispatch would use)."""
    from cni_plugins.spec.version import CURRENT_VERSION

    value = conf.get("cniVersion") if conf is not None else None
    return value if isinstance(value, str) and value else CURRENT_VERSION


def _delegate_refusal(plugin_type: str, environ: dict[str, str], conf: dict[str, Any] | None) -> str:
    """Why this request would execute a plugin the agent may not run ("" when it obviously would not).

    The IPAM plugin a bridge or vxlan configuration names, looked up in
    CNI_PATH as the plugin will: pycni's own (served in-process) is fine,
    another executable must be in an allowed directory. Whatever this cannot
    tell is left to the plugin, where ``exec.ExecPolicy`` decides for real.
    """
    from cni_plugins.shared.delegate import NO_INPROCESS_VARS
    from cni_plugins.shared.ipam import ipam_type
    from cni_plugins.spec.errors import CNIError
    from cni_plugins.spec.exec import ExecPolicy, ExecRefused, check_plugin_name, find_executable
    from cni_plugins.spec.registry import own_plugin

    if conf is None or plugin_type not in _IPAM_DELEGATORS:
        return ""
    try:
        name = ipam_type(conf) or _IPAM_DELEGATORS[plugin_type]
        if not name:
            return ""
        check_plugin_name(name)
    except CNIError:
        return ""  # the plugin reports the configuration error
    found = find_executable(name, [d for d in environ.get("CNI_PATH", "").split(os.pathsep) if d])
    if found is None:
        return ""
    if not any(environ.get(var) for var in NO_INPROCESS_VARS) and own_plugin(found) == name:
        return ""
    policy = ExecPolicy.from_environ(environ)
    assert policy is not None
    try:
        policy.executable(found)
    except ExecRefused as exc:
        return f"ipam type {name!r}: {exc}"
    return ""


class _Oversized(Exception):
    """A request whose header announces more than the agent takes."""


class _NothingSent(Exception):
    """A peer that hung up without sending anything (a shim that ran the request itself after all, a probe)."""


def _read_request(conn: socket.socket, deadline: float) -> tuple[bytes, list[int]]:
    """The request body and the descriptors that came with it (the caller closes them).

    All of it by ``deadline``, however slowly it comes. Descriptors come only
    with the header (recvmsg); any sent with later bytes are discarded by the
    kernel unreceived (plain recv has no room for them).
    """
    fds: list[int] = []
    head = b""
    try:
        while len(head) < 12:
            _time_left(conn, deadline)
            data, ancdata, flags, _ = conn.recvmsg(
                12 - len(head), socket.CMSG_SPACE(_MAX_FDS * _FD.size), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % _FD.size
                    fds.extend(_FD.unpack_from(payload, i)[0] for i in range(0, usable, _FD.size))
            if flags & socket.MSG_CTRUNC:
                raise protocol.ProtocolError("too many descriptors")
            if not data:
                if not head and not fds:
                    raise _NothingSent()
                raise EOFError("connection closed before a whole request")
            head += data
        if head[:8] != protocol.MAGIC:
            raise protocol.ProtocolError("not a pycni agent request (or another protocol version)")
        (size,) = struct.unpack(">I", head[8:12])
        if size > protocol.MAX_BODY:
            raise _Oversized(
                f"a request of {size} bytes is larger than the agent takes "
                f"({protocol.MAX_BODY >> 20} MiB); run it in-process"
            )
        chunks = []
        while size:
            _time_left(conn, deadline)
            chunk = conn.recv(min(size, 1 << 20))
            if not chunk:
                raise EOFError("connection closed before a whole request")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks), fds
    except BaseException:
        _close_all(fds)
        raise


def _time_left(conn: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request did not arrive in time")
    conn.settimeout(left)


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


def _try_again(cni_version: str, msg: str, details: str) -> bytes:
    from cni_plugins.spec.errors import ERR_TRY_AGAIN, CNIError

    text = CNIError(ERR_TRY_AGAIN, msg, details).to_json(cni_version) + "\n"
    return protocol.answer(protocol.DONE, b"1", _said(text), b"")


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
        raise AgentError(
            f"refusing to put the agent's socket in {directory}: it must belong to "
            f"uid {os.geteuid()} and not be writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); use a directory like /run/pycni"
        )


def _take_lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentError(f"another pycni agent is serving {path[: -len('.lock')]} (it holds {path})") from None
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


# syslog priorities (sd-daemon(3)) of the logging levels: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7.
_JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    return next((priority for level, priority in _JOURNAL_PRIORITIES if levelno >= level), 7)


class JournalFormatter(logging.Formatter):
    """A log line for the journal: ``<N>`` (sd-daemon(3)) before every line of a record, N its level's
    syslog priority, and no timestamp or pid (journald records both)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        # Every line: journald reads a traceback's lines as entries of their own.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def is_journal_stream(stream: Any) -> bool:
    """Whether ``stream`` is connected to the journal: systemd sets JOURNAL_STREAM to its
    ``device:inode`` (systemd.exec(5)); a child whose stderr went elsewhere inherits the variable
    but not the stream, so both must match."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (AttributeError, ValueError, OSError):
        return False


def use_journal_format(logger: logging.Logger) -> bool:
    """Give the handlers of ``logger`` that write to the journal (under systemd) the journal's format."""
    switched = False
    for handler in logger.handlers:
        if (
            isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and is_journal_stream(handler.stream)
        ):
            handler.setFormatter(JournalFormatter())
            switched = True
    return switched


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
