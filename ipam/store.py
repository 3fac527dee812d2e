"""The on-disk store of host-local, in the reference plugin's layout.

    <dataDir>/<network>/<ip>                  "<containerID>\\r\\n<ifname>" (legacy: "<containerID>")
    <dataDir>/<network>/last_reserved_ip.<n>  the address last handed out from range set n
    <dataDir>/<network>/lock                  flock(LOCK_EX) around every read-modify-write

Because the layout and the lock are the reference's, pycni and the Go
host-local can serve one node from one directory. A reservation appears in one
step: its content is written to a temporary file that is then hard-linked to
the address's name, which fails if the name exists, so no reader ever sees a
half-written reservation and no reservation is ever overwritten.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

LINE_BREAK = "\r\n"
LAST_IP_PREFIX = "last_reserved_ip."
LOCK_NAME = "lock"
TMP_PREFIX = ".pycni-tmp-"
FILE_MODE = 0o644   # the reference v1.1.1's mode for reservation files
LOCK_MODE = 0o750   # what the reference's filemutex creates its lock file with
DIR_MODE = 0o755


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


def _read_text(path: str) -> str:
    # Binary read: text mode would turn the reference's "\r\n" into "\n".
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", errors="replace")


def parse_reservation(ip: str, content: str) -> Reservation:
    text = content.strip()
    container_id, sep, ifname = text.partition(LINE_BREAK)
    return Reservation(ip=ip, container_id=container_id, ifname=ifname if sep else None)


class DiskStore:
    """One network's directory of reservations. Use ``locked()`` around changes."""

    def __init__(self, network: str, data_dir: str, create: bool = True) -> None:
        self.network = network
        self.dir = os.path.join(data_dir, network)
        if create:
            os.makedirs(self.dir, mode=DIR_MODE, exist_ok=True)
            os.close(self._open_lock())  # the reference creates the lock file on open, too

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def _open_lock(self) -> int:
        return os.open(os.path.join(self.dir, LOCK_NAME), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)

    @contextmanager
    def locked(self) -> Iterator["DiskStore"]:
        """Hold the directory's flock; every process sharing the directory takes it."""
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    # ---- reading ------------------------------------------------------
    def reservations(self) -> list[Reservation]:
        """Every reservation file of the network (file names that are IP addresses)."""
        out = []
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not _is_ip(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                content = _read_text(entry.path)
            except OSError:
                continue  # released meanwhile, or unreadable: not ours to judge
            out.append(parse_reservation(entry.name, content))
        return out

    def get_by_id(self, container_id: str, ifname: str) -> list[str]:
        return [r.ip for r in self.reservations()
                if r.owned_by(container_id, ifname) or r.owned_by_legacy(container_id)]

    def find_by_id(self, container_id: str, ifname: str) -> bool:
        return bool(self.get_by_id(container_id, ifname))

    def owner_of(self, ip: str) -> Reservation | None:
        try:
            return parse_reservation(ip, _read_text(os.path.join(self.dir, ip)))
        except FileNotFoundError:
            return None

    def last_reserved_ip(self, range_id: int) -> str | None:
        try:
            with open(os.path.join(self.dir, f"{LAST_IP_PREFIX}{range_id}"), encoding="utf-8") as handle:
                return handle.read().strip() or None
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def last_reserved_all(self) -> dict[int, str]:
        """range set index -> the address last reserved from it."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return {}
        out = {}
        for name in names:
            index = name[len(LAST_IP_PREFIX):]
            if name.startswith(LAST_IP_PREFIX) and index.isdigit():
                ip = self.last_reserved_ip(int(index))
                if ip:
                    out[int(index)] = ip
        return dict(sorted(out.items()))

    # ---- changing (hold the lock) -----------------------------------------
    def reserve(self, container_id: str, ifname: str, ip: str, range_id: int) -> bool:
        """Claim ``ip`` for the container; False if someone holds it already."""
        final = os.path.join(self.dir, ip)
        if os.path.lexists(final):
            return False
        content = f"{container_id.strip()}{LINE_BREAK}{ifname}"
        tmp = self._write_temp(content)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        try:
            self._write_last_reserved(ip, range_id)
        except OSError:
            os.unlink(final)
            raise
        return True

    def _write_temp(self, content: str) -> str:
        tmp = os.path.join(self.dir, f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, content.encode())
        except OSError:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _write_last_reserved(self, ip: str, range_id: int) -> None:
        tmp = self._write_temp(ip)
        try:
            os.replace(tmp, os.path.join(self.dir, f"{LAST_IP_PREFIX}{range_id}"))
        except OSError:
            os.unlink(tmp)
            raise

    def release_ip(self, ip: str) -> bool:
        try:
            os.unlink(os.path.join(self.dir, ip))
        except FileNotFoundError:
            return False
        return True

    def release_by_id(self, container_id: str, ifname: str) -> list[str]:
        """Release the container's reservations for ``ifname``; if it has none,
        those from legacy files that name only the container ID (as the reference does)."""
        reservations = self.reservations()
        released = [r.ip for r in reservations if r.owned_by(container_id, ifname) and self.release_ip(r.ip)]
        if not released:
            released = [r.ip for r in reservations
                        if r.owned_by_legacy(container_id) and self.release_ip(r.ip)]
        return released

    def remove_stale_temp_files(self) -> None:
        """Drop temporary files a crashed writer left behind (call with the lock held)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
