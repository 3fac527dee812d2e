"""The on-disk store of host-local, in the reference plugin's layout.

    <dataDir>/<network>/<ip>                  "<containerID>\\r\\n<ifname>" (legacy: "<containerID>")
    <dataDir>/<network>/last_reserved_ip.<n>  the address last handed out from range set n
    <dataDir>/<network>/lock                  flock(LOCK_EX) around every read-modify-write

Because the layout and the lock are the reference's, pycni and the Go
host-local can serve one node from one directory. A reservation appears in one
step: its content is written to a temporary file that is then hard-linked to
the address's name, which fails if the name exists, so no reader ever sees a
half-written reservation and no reservation is ever overwritten.

Nothing under the data directory is reached through a symbolic link: the
network's directory is opened with O_DIRECTORY|O_NOFOLLOW and every file in it
(the lock included) relative to that descriptor with O_NOFOLLOW, so a link
planted there (``lock -> /etc/shadow``, ``<network> -> /etc``) is refused with
an I/O error and nothing is written through it. The data directory itself is
the operator's choice and may be a link.

Temporary files (``.pycni-tmp-<pid>-<hex>``) are removed on every path out of
a write, also when it fails or is interrupted; one left by a writer that was
killed is removed by GC (``remove_stale_temp_files``).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from cni_plugins.kernel.files import temp_writer_gone
from cni_plugins.spec.errors import ERR_IO, CNIError

LINE_BREAK = "\r\n"
LAST_IP_PREFIX = "last_reserved_ip."
LOCK_NAME = "lock"
TMP_PREFIX = ".pycni-tmp-"
FILE_MODE = 0o644  # the reference v1.1.1's mode for reservation files
LOCK_MODE = 0o750  # what the reference's filemutex creates its lock file with
DIR_MODE = 0o755
# A temporary file older than this is stale even if a process with its writer's PID runs
# (PIDs are reused; and writers hold the lock, so a live one never lasts this long).
STALE_TEMP_SECONDS = 60.0

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW


@dataclass(frozen=True)
class Reservation:
    ip: str
    container_id: str
    ifname: str | None  # None: a legacy file holding only the container ID

    def owned_by(self, container_id: str, ifname: str) -> bool:
        return self.container_id == container_id.strip() and self.ifname == ifname

    def owned_by_legacy(self, container_id: str) -> bool:
        return self.ifname is None and self.container_id == container_id.strip()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def parse_reservation(ip: str, content: str) -> Reservation:
    text = content.strip()
    container_id, sep, ifname = text.partition(LINE_BREAK)
    return Reservation(ip=ip, container_id=container_id, ifname=ifname if sep else None)


def _symlink_refused(path: str) -> CNIError:
    return CNIError(
        ERR_IO,
        f"host-local store: {path} is a symbolic link or not a regular entry; refusing to follow it",
        "nothing under ipam.dataDir is followed through a link: remove the link (and check who planted it)",
    )


class DiskStore:
    """One network's directory of reservations. Use ``locked()`` around changes."""

    def __init__(self, network: str, data_dir: str, create: bool = True) -> None:
        self.network = network
        self.data_dir = data_dir
        self.dir = os.path.join(data_dir, network)
        self._fd: int | None = None  # the network directory while locked()
        if create:
            os.makedirs(data_dir, mode=DIR_MODE, exist_ok=True)
            try:
                os.mkdir(self.dir, DIR_MODE)
            except FileExistsError:
                pass
            with self._directory() as fd:
                os.close(self._open_lock(fd))  # the reference creates the lock file on open, too

    def exists(self) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.dir).st_mode)
        except OSError:
            return False

    # ---- descriptors (never through a link) ----------------------------------
    def _open_dir(self) -> int:
        try:
            return os.open(self.dir, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(self.dir):
                raise _symlink_refused(self.dir) from None
            raise

    @contextmanager
    def _directory(self) -> Iterator[int]:
        """The network directory's descriptor: the locked one, or one opened for this call."""
        if self._fd is not None:
            yield self._fd
            return
        fd = self._open_dir()
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_in(self, dir_fd: int, name: str, flags: int, mode: int = FILE_MODE) -> int:
        try:
            return os.open(name, flags | _NOFOLLOW, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _symlink_refused(os.path.join(self.dir, name)) from None
            raise

    def _open_lock(self, dir_fd: int) -> int:
        return self._open_in(dir_fd, LOCK_NAME, os.O_RDONLY | os.O_CREAT, LOCK_MODE)

    def _read(self, dir_fd: int, name: str) -> str:
        # Binary read: text mode would turn the reference's "\r\n" into "\n".
        fd = self._open_in(dir_fd, name, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _symlink_refused(os.path.join(self.dir, name))
            chunks = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode("utf-8", errors="replace")
        finally:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator["DiskStore"]:
        """Hold the directory's flock; every process sharing the directory takes it."""
        dir_fd = self._open_dir()
        try:
            fd = self._open_lock(dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fd = dir_fd
                try:
                    yield self
                finally:
                    self._fd = None
            finally:
                os.close(fd)  # closing the descriptor drops the lock
        finally:
            os.close(dir_fd)

    # ---- reading ------------------------------------------------------
    def reservations(self) -> list[Reservation]:
        """Every reservation file of the network (file names that are IP addresses)."""
        out = []
        try:
            with self._directory() as fd:
                for entry in list(os.scandir(fd)):
                    if not _is_ip(entry.name) or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        content = self._read(fd, entry.name)
                    except (OSError, CNIError):
                        continue  # released meanwhile, or unreadable: not ours to judge
                    out.append(parse_reservation(entry.name, content))
        except FileNotFoundError:
            return []
        return out

    def get_by_id(self, container_id: str, ifname: str) -> list[str]:
        return [
            r.ip for r in self.reservations() if r.owned_by(container_id, ifname) or r.owned_by_legacy(container_id)
        ]

    def find_by_id(self, container_id: str, ifname: str) -> bool:
        return bool(self.get_by_id(container_id, ifname))

    def owner_of(self, ip: str) -> Reservation | None:
        try:
            with self._directory() as fd:
                return parse_reservation(ip, self._read(fd, ip))
        except FileNotFoundError:
            return None
        except CNIError:
            return None  # a link or a non-file under the address's name: no reservation of anyone's

    def last_reserved_ip(self, range_id: int) -> str | None:
        try:
            with self._directory() as fd:
                text = self._read(fd, f"{LAST_IP_PREFIX}{range_id}")
        except (FileNotFoundError, CNIError):
            return None
        return text.strip() or None

    def last_reserved_all(self) -> dict[int, str]:
        """range set index -> the address last reserved from it."""
        try:
            with self._directory() as fd:
                names = os.listdir(fd)
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            index = name[len(LAST_IP_PREFIX) :]
            if name.startswith(LAST_IP_PREFIX) and index.isdigit():
                ip = self.last_reserved_ip(int(index))
                if ip:
                    out[int(index)] = ip
        return dict(sorted(out.items()))

    # ---- changing (hold the lock) -----------------------------------------
    def reserve(self, container_id: str, ifname: str, ip: str, range_id: int) -> bool:
        """Claim ``ip`` for the container; False if someone holds it already."""
        content = f"{container_id.strip()}{LINE_BREAK}{ifname}".encode()  # before any file exists
        with self._directory() as fd:
            try:
                os.lstat(ip, dir_fd=fd)
                return False
            except FileNotFoundError:
                pass
            tmp = self._write_temp(fd, content)
            try:
                os.link(tmp, ip, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                return False
            finally:
                _unlink_quietly(fd, tmp)
            try:
                self._write_last_reserved(fd, ip, range_id)
            except BaseException:
                _unlink_quietly(fd, ip)
                raise
        return True

    def _write_temp(self, dir_fd: int, content: bytes) -> str:
        """A new temporary file holding ``content``; removed again if anything goes wrong."""
        name = f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        fd = self._open_in(dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            _unlink_quietly(dir_fd, name)
            raise
        os.close(fd)
        return name

    def _write_last_reserved(self, dir_fd: int, ip: str, range_id: int) -> None:
        tmp = self._write_temp(dir_fd, ip.encode())
        try:
            os.replace(tmp, f"{LAST_IP_PREFIX}{range_id}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _unlink_quietly(dir_fd, tmp)
            raise

    def release_ip(self, ip: str) -> bool:
        try:
            with self._directory() as fd:
                os.unlink(ip, dir_fd=fd)
        except FileNotFoundError:
            return False
        return True

    def release_by_id(self, container_id: str, ifname: str) -> list[str]:
        """Release the container's reservations for ``ifname``; if it has none,
        those from legacy files that name only the container ID (as the reference does)."""
        reservations = self.reservations()
        released = [r.ip for r in reservations if r.owned_by(container_id, ifname) and self.release_ip(r.ip)]
        if not released:
            released = [r.ip for r in reservations if r.owned_by_legacy(container_id) and self.release_ip(r.ip)]
        return released

    def remove_stale_temp_files(self, max_age: float = STALE_TEMP_SECONDS) -> list[str]:
        """Drop temporary files a killed writer left behind (call with the lock held).

        A file is stale when the process named in it no longer runs, or when it
        is older than ``max_age`` seconds. Returns the names removed.
        """
        removed = []
        now = time.time()
        try:
            with self._directory() as fd:
                for name in os.listdir(fd):
                    if not name.startswith(TMP_PREFIX):
                        continue
                    try:
                        age = now - os.lstat(name, dir_fd=fd).st_mtime
                    except FileNotFoundError:
                        continue
                    if temp_writer_gone(name, TMP_PREFIX) or age > max_age:
                        if _unlink_quietly(fd, name):
                            removed.append(name)
        except FileNotFoundError:
            return []
        return removed


def _unlink_quietly(dir_fd: int, name: str) -> bool:
    """Remove ``name`` (never following a link); True if it was there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True
