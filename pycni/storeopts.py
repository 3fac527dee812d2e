"""The cluster-store options every command that reaches the store shares, and opening it.

``--store URL`` plus ``--etcd-prefix``, ``--etcd-cafile``, ``--etcd-certfile``,
``--etcd-keyfile`` (``etcd_options``) and ``--timeout`` (``store_options``
adds all of them); ``tls_files`` and ``open_from_options`` turn them into a
store; ``store_errors`` ends a command on a store failure with its one-line
message and exit status 1.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

STORE_HELP = ("Where the cluster state lives: file:///DIR for a local directory (one machine, or nodes "
              "sharing a filesystem), or etcd://HOST:PORT[,HOST:PORT...] for an etcd v3 cluster (list several "
              "members; they are tried in order).")


def _apply(fn: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        fn = option(fn)
    return fn


def etcd_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--etcd-prefix and the TLS files of an etcd store."""
    return _apply(fn, [
        click.option("--etcd-prefix", default="/pycni", show_default=True, metavar="PREFIX",
                     help="Key prefix in etcd, so several clusters can share one etcd (ignored for file://)."),
        click.option("--etcd-cafile", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="CA certificate that signed etcd's server certificate; turns on TLS (https)."),
        click.option("--etcd-certfile", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="Client certificate, for etcd started with --client-cert-auth; turns on TLS."),
        click.option("--etcd-keyfile", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="Private key of --etcd-certfile."),
    ])


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--store (required), the etcd options and --timeout."""
    return _apply(fn, [
        click.option("--store", "store_url", required=True, metavar="URL", help=STORE_HELP),
        etcd_options,
        click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
                     metavar="SECONDS", help="How long to wait for each store request."),
    ])


def tls_files(cafile: str | None, certfile: str | None, keyfile: str | None) -> Any:
    """The TLSFiles the options name, or None for plain http (and file:// stores)."""
    if not (cafile or certfile or keyfile):
        return None
    if keyfile and not certfile:
        raise click.BadParameter("a client key needs its certificate: give --etcd-certfile too",
                                 param_hint="--etcd-keyfile")
    from ipam.cluster import TLSFiles

    return TLSFiles(cafile=cafile, certfile=certfile, keyfile=keyfile)


def open_from_options(store_url: str, etcd_prefix: str, etcd_cafile: str | None, etcd_certfile: str | None,
                      etcd_keyfile: str | None, timeout: float = 5.0) -> Any:
    """Open the store the options name; a bad URL is a usage error naming --store."""
    from ipam.cluster import StoreError, open_store

    tls = tls_files(etcd_cafile, etcd_certfile, etcd_keyfile)
    try:
        return open_store(store_url, prefix=etcd_prefix, tls=tls, timeout=timeout)
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
