"""The cluster-store options every command that reaches the store shares, and opening it.

``--store URL`` plus ``--etcd-prefix``, ``--etcd-cafile``, ``--etcd-certfile``,
``--etcd-keyfile``, ``--etcd-username``, ``--etcd-password-file``
(``etcd_options``) and ``--timeout`` (``store_options`` adds all of them);
``tls_files``, ``store_auth`` and ``open_from_options`` turn them into a
store; ``store_errors`` ends a command on a store failure with its one-line
message and exit status 1.

Each store flag also comes from an environment variable of its own, named in
``--help`` (``PYCNI_STORE``, ``PYCNI_ETCD_PREFIX``, ``PYCNI_ETCD_CAFILE``,
``PYCNI_ETCD_CERTFILE``, ``PYCNI_ETCD_KEYFILE``, ``PYCNI_ETCD_USERNAME``,
``PYCNI_ETCD_PASSWORD_FILE``); the flag wins over the variable.

The etcd user's flags reach the store without appearing in the commands'
signatures: their callbacks keep them in the click context (``ctx.meta``),
and ``open_from_options`` (or ``store_auth``) takes them from there. The
password comes from a file, read when the store is opened; a file that its
group or others may read is refused (as ssh refuses such a key): the
password lets its reader rewrite every node's lease.
"""

from __future__ import annotations

import functools
import os
import stat
from typing import Any, Callable

import click

STORE_HELP = (
    "Where the cluster state lives: file:///DIR for a local directory (one machine, or nodes "
    "sharing a filesystem), or an etcd v3 cluster (list several members; they are tried in order): "
    "etcd://HOST:PORT[,HOST:PORT...] (https when TLS files are given), or flannel's --etcd-endpoints "
    "form http://HOST:PORT[,http://HOST:PORT...] (plain http) or https://HOST:PORT[,https://HOST:PORT...] "
    "(TLS; without --etcd-cafile the system's trusted CAs verify etcd). PORT defaults to 2379."
)

STORE_ENVVAR = "PYCNI_STORE"
MAX_PASSWORD_FILE = 4096
_AUTH_META = "pycni.storeopts.auth"  # ctx.meta key: {"username": NAME, "password_file": PATH}


def _apply(fn: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        fn = option(fn)
    return fn


def etcd_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--etcd-prefix, the TLS files and the user of an etcd store."""
    return _apply(
        fn,
        [
            click.option(
                "--etcd-prefix",
                default="/pycni",
                show_default=True,
                metavar="PREFIX",
                envvar="PYCNI_ETCD_PREFIX",
                show_envvar=True,
                help="Key prefix in etcd, so several clusters can share one etcd (ignored for file://).",
            ),
            click.option(
                "--etcd-cafile",
                type=click.Path(exists=True, dir_okay=False),
                metavar="FILE",
                envvar="PYCNI_ETCD_CAFILE",
                show_envvar=True,
                help="CA certificate that signed etcd's server certificate; turns on TLS for etcd:// "
                "(an https:// store without it trusts the system's CAs).",
            ),
            click.option(
                "--etcd-certfile",
                type=click.Path(exists=True, dir_okay=False),
                metavar="FILE",
                envvar="PYCNI_ETCD_CERTFILE",
                show_envvar=True,
                help="Client certificate, for etcd started with --client-cert-auth; turns on TLS.",
            ),
            click.option(
                "--etcd-keyfile",
                type=click.Path(exists=True, dir_okay=False),
                metavar="FILE",
                envvar="PYCNI_ETCD_KEYFILE",
                show_envvar=True,
                help="Private key of --etcd-certfile.",
            ),
            click.option(
                "--etcd-username",
                metavar="NAME",
                envvar="PYCNI_ETCD_USERNAME",
                show_envvar=True,
                expose_value=False,
                callback=_remember_username,
                help="etcd user, for an etcd with authentication enabled (its roles must grant readwrite "
                "on the --etcd-prefix keys); needs --etcd-password-file.",
            ),
            click.option(
                "--etcd-password-file",
                metavar="FILE",
                envvar="PYCNI_ETCD_PASSWORD_FILE",
                show_envvar=True,
                type=click.Path(dir_okay=False),
                expose_value=False,
                callback=_remember_password_file,
                help="File holding the password of --etcd-username (one line; a trailing newline is "
                "ignored). It must not be readable by group or others: chmod 600.",
            ),
        ],
    )


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--store (required), the etcd options and --timeout."""
    return _apply(
        fn,
        [
            click.option(
                "--store",
                "store_url",
                required=True,
                metavar="URL",
                envvar=STORE_ENVVAR,
                show_envvar=True,
                help=STORE_HELP,
            ),
            etcd_options,
            click.option(
                "--timeout",
                default=5.0,
                show_default=True,
                type=click.FloatRange(min=0.1),
                metavar="SECONDS",
                help="How long to wait for each store request.",
            ),
        ],
    )


def tls_files(cafile: str | None, certfile: str | None, keyfile: str | None) -> Any:
    """The TLSFiles the options name, or None for plain http (and file:// stores)."""
    if not (cafile or certfile or keyfile):
        return None
    if keyfile and not certfile:
        raise click.BadParameter(
            "a client key needs its certificate: give --etcd-certfile too", param_hint="--etcd-keyfile"
        )
    from ipam.cluster import TLSFiles

    return TLSFiles(cafile=cafile, certfile=certfile, keyfile=keyfile)


def _remember_username(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta.setdefault(_AUTH_META, {})["username"] = value or None


def _remember_password_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta.setdefault(_AUTH_META, {})["password_file"] = value or None


def read_password_file(path: str) -> str:
    """The password in the file at path: its first line (the trailing newline dropped).

    Refused (a usage error naming --etcd-password-file): a file missing, not
    a regular file, readable by group or others, larger than
    MAX_PASSWORD_FILE bytes, empty, or with more than one line.
    """
    hint = "--etcd-password-file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as err:
        raise click.BadParameter(f"cannot open {path}: {err.strerror}", param_hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise click.BadParameter(f"{path} is not a regular file", param_hint=hint)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o044:
            raise click.BadParameter(
                f"{path} is readable by group or others (mode {mode:04o}), and the password in it lets its "
                f"reader rewrite every node's lease: chmod 600 {path} (in Kubernetes, a secret volume's "
                f"defaultMode: 0400)",
                param_hint=hint,
            )
        data = os.read(fd, MAX_PASSWORD_FILE + 1)
    except OSError as err:
        raise click.BadParameter(f"cannot read {path}: {err.strerror}", param_hint=hint) from None
    finally:
        os.close(fd)
    if len(data) > MAX_PASSWORD_FILE:
        raise click.BadParameter(
            f"{path} is larger than {MAX_PASSWORD_FILE} bytes: it should hold the etcd password alone", param_hint=hint
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint=hint) from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise click.BadParameter(f"{path} holds no password (its first line is empty)", param_hint=hint)
    if any(line.strip() for line in lines[1:]):
        raise click.BadParameter(
            f"{path} has more than one line: it should hold the etcd password alone", param_hint=hint
        )
    return password


def store_auth(ctx: click.Context | None = None) -> Any:
    """The StoreAuth that --etcd-username/--etcd-password-file name (in ctx or the current context), or None.

    The password file is read here, when a store is about to be opened (not
    while parsing: `pycni agent status` must not need it). One flag without
    the other is a usage error.
    """
    ctx = ctx if ctx is not None else click.get_current_context(silent=True)
    given = (ctx.meta.get(_AUTH_META) if ctx is not None else None) or {}
    username, password_file = given.get("username"), given.get("password_file")
    if username and not password_file:
        raise click.BadParameter(
            "an etcd user needs its password: give --etcd-password-file FILE too", param_hint="--etcd-username"
        )
    if password_file and not username:
        raise click.BadParameter(
            f"the password in {password_file} needs its user: give --etcd-username NAME too",
            param_hint="--etcd-password-file",
        )
    if not username:
        return None
    password = read_password_file(password_file)
    from ipam.cluster import StoreAuth, StoreError

    try:
        return StoreAuth(username, password)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--etcd-username") from None


def open_from_options(
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float = 5.0,
    auth: Any = None,
) -> Any:
    """Open the store the options name; a bad URL is a usage error naming --store.

    auth is a StoreAuth; None: the etcd user the command line (the current
    click context) names, if any.
    """
    from ipam.cluster import StoreError, open_store

    tls = tls_files(etcd_cafile, etcd_certfile, etcd_keyfile)
    if auth is None:
        auth = store_auth()
    try:
        return open_store(store_url, prefix=etcd_prefix, tls=tls, auth=auth, timeout=timeout)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None


def store_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A store failure ends the command with exit status 1 and its one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ipam.cluster import StoreError

        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None

    return wrapper
