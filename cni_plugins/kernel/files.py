"""Writing files so that readers see the old content or the new, never a partial one; reading
small state files without following a planted link; trusting state only if root wrote it.

The data goes to a synced temporary file in the same directory (created with
O_EXCL by mkstemp, so never through a planted link) and is renamed over the
target: a rename replaces a symlink at the target itself instead of writing
through it. The temporary file is removed on every path out, also on an
interrupt.

State that decides what a root process does (the overlay state, the vxlan
plugin's delegate cache) is trusted only when nobody but root could have
written it: the file and its directory owned by root (by the reader's euid,
which is root on a node) and not writable by group or others
(``trust_problem``). ``open_trusted_dir`` opens such a directory for reading
without following a link; ``ensure_private_dir`` makes one for writing (mode
0700), tightening a root-owned directory that grants more (the 0755 of an older
version) and refusing one that someone else owns or may write.
"""

from __future__ import annotations

import os
import stat


def write_atomically(path: str, data: bytes, mode: int, prefix: str = ".pycni-tmp-", sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` (file mode ``mode``) through a temp file and a rename.

    The temporary file's name carries the writer's PID (``PREFIX<pid>-XXXX.tmp``): a writer
    killed between creating and renaming it leaves one behind, and ``remove_orphaned_temps``
    tells those from the temporary files of writers still at work.
    """
    import tempfile  # here, not at the top: readers of small files (plugins' cold starts) need none of it

    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:  # the rename itself survives a crash
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def temp_writer_gone(name: str, prefix: str) -> bool:
    """Whether the process named in a temporary file's name (``PREFIX<pid>-...``) no longer runs."""
    pid_text = name[len(prefix) :].partition("-")[0]
    if not pid_text.isdigit() or not 0 < int(pid_text) <= 1 << 22:  # 1 << 22: the kernel's largest pid_max
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False


def remove_orphaned_temps(directory: str, prefix: str) -> list[str]:
    """Remove ``write_atomically`` temporaries in ``directory`` whose writer is gone; returns their names.

    Only ``PREFIX<pid>-*.tmp`` regular files whose PID is no running process are
    removed (never through a link): a writer still at work keeps its file.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")) or not temp_writer_gone(name, prefix):
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            pass
    return removed


class NotRegularFile(Exception):
    """The path is there but is not a regular file (a directory, a FIFO, a device)."""


class UntrustedPath(Exception):
    """A state file or directory that someone other than root could have written (or a link).

    ``path`` names it, ``problem`` says what is wrong with it ("is owned by uid
    1000, not by root"), ``fix`` what to do; str() is all three.
    """

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path} {problem}: {fix}")
        self.path = path
        self.problem = problem
        self.fix = fix


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def trust_problem(info: os.stat_result) -> str:
    """Why a file or directory with this stat cannot be trusted ("" when it can).

    Trusted: owned by root or by this process's euid, and not writable by group or others.
    """
    euid = os.geteuid()
    if info.st_uid not in (0, euid):
        owners = "root" if euid == 0 else f"root or uid {euid}"
        return f"is owned by uid {info.st_uid}, not by {owners}"
    if info.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if info.st_mode & bit)
        return f"is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


def open_trusted_dir(path: str, fix: str) -> int | None:
    """A descriptor of the directory ``path`` for reading its state; None if it does not exist.

    UntrustedPath (with ``fix`` as the advice) if it is a symlink, not a
    directory, or fails ``trust_problem``. The caller closes the descriptor.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR, not ELOOP: tell them apart.
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise UntrustedPath(
                path,
                "is a symbolic link; refusing to follow it",
                "make it a real directory (and check who planted the link)",
            ) from None
        raise UntrustedPath(path, "is not a directory", "remove it") from None
    try:
        problem = trust_problem(os.fstat(fd))
        if problem:
            raise UntrustedPath(path, problem, fix)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_private_dir(path: str, mode: int = 0o700) -> bool:
    """Make sure ``path`` is a directory only root can use: created with ``mode``, or checked.

    A missing directory is created (its parents with the default mode). An
    existing one must be a directory (not a link), owned by root (this
    process's euid) and not writable by group or others, else UntrustedPath;
    if it grants more than ``mode`` (0755, as older versions made it), it is
    tightened to ``mode``. Returns True when it tightened an existing directory.
    """
    created = False
    try:
        os.mkdir(path, mode)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.mkdir(path, mode)
            created = True
        except FileExistsError:
            pass
    fix = (
        f"it must belong to root and be writable by root alone: remove it, or check what is in it "
        f"and run `chown root:root {path} && chmod {mode:04o} {path}`"
    )
    fd = open_trusted_dir(path, fix)
    if fd is None:  # removed between mkdir and open: that is not ours to fight over
        raise FileNotFoundError(2, "No such file or directory", path)
    try:
        current = stat.S_IMODE(os.fstat(fd).st_mode)
        if created:
            if current != mode:
                os.fchmod(fd, mode)  # not narrowed by the umask
            return False
        if current & 0o777 & ~mode:
            os.fchmod(fd, (current & ~0o777) | (mode & 0o777))
            return True
        return False
    finally:
        os.close(fd)


def read_regular_file(
    path: str, max_bytes: int, *, dir_fd: int | None = None, trusted: str | None = None
) -> bytes | None:
    """At most ``max_bytes + 1`` bytes of ``path`` (more than ``max_bytes``: the caller's "too large").

    None if there is no such file. Never follows a symlink at ``path`` (OSError with errno ELOOP);
    NotRegularFile for anything but a regular file; other OSErrors as os.open raises them.
    ``dir_fd``: ``path`` is relative to that directory. ``trusted``: the file must pass
    ``trust_problem`` (checked on the open file), else UntrustedPath with this text as the advice.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path)
        if trusted is not None:
            problem = trust_problem(info)
            if problem:
                raise UntrustedPath(path, problem, trusted)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1)
    finally:
        os.close(fd)


def lock_holders(fd: int) -> list[tuple[int, str]]:
    """(PID, command name) of every process holding a lock on the file open at ``fd``, from /proc/locks.

    Blocked waiters are not holders and are left out. The PIDs are as this
    process's PID namespace sees them; a command is "?" when the process is
    gone or hidden. [] when /proc/locks cannot be read.
    """
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    same_inode, same_file = [], []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read(4 * 1024 * 1024).splitlines()
    except OSError:
        return []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter has "->" after the number.
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        pid_text, where = fields[4], fields[5]
        if not pid_text.isdigit():
            continue
        if where == device:
            same_file.append(int(pid_text))
        elif where.rpartition(":")[2] == str(info.st_ino):
            same_inode.append(int(pid_text))
    # Some filesystems (btrfs subvolumes, overlays) report another device in stat() than in
    # /proc/locks: fall back to the inode number alone when the full match finds nothing.
    pids = same_file or same_inode
    holders = []
    for pid in sorted(set(pids)):
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
                command = handle.read(64).strip() or "?"
        except OSError:
            command = "?"
        holders.append((pid, command))
    return holders
