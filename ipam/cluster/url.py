"""Opening the cluster store a URL names: file:///DIR, etcd://HOST:PORT[,HOST:PORT...], or flannel's
--etcd-endpoints form http(s)://HOST:PORT[,http(s)://HOST:PORT...]."""

from __future__ import annotations

from .errors import StoreError
from .etcd import EtcdStore, parse_endpoints
from .filestore import FileStore
from .store import ACCEPTED_URLS, Store, StoreAuth, TLSFiles

ETCD_SCHEMES = ("etcd", "http", "https")


def open_store(
    url: str,
    *,
    prefix: str = "/pycni",
    tls: TLSFiles | None = None,
    auth: StoreAuth | None = None,
    timeout: float = 5.0,
) -> Store:
    """Open the cluster store at url.

    file:///DIR opens a local file store in DIR (created if missing; prefix
    does not apply: the directory is the store). etcd://HOST:PORT[,HOST:PORT...]
    talks to etcd v3 through its JSON gateway, trying the endpoints in order;
    with tls it uses https (without it, one warning per process: see
    EtcdStore). flannel's --etcd-endpoints form names the scheme itself:
    http://HOST:PORT[,http://HOST:PORT...] is plain http (TLS files are
    refused), https://HOST:PORT[,https://HOST:PORT...] is TLS (tls as for
    etcd://; without it the system's trusted CAs verify the server). One list
    has one scheme. PORT defaults to 2379 in every form. auth, for an etcd
    with authentication enabled, is the user the store authenticates as.
    timeout bounds every request (seconds), and how long a file store waits
    for its lock.

    An etcd store opens its connections in the network namespace of the
    thread that called open_store(), whichever thread uses it later.
    """
    if not isinstance(url, str) or not url:
        raise StoreError(f"invalid store URL {url!r}: use {ACCEPTED_URLS}")
    if timeout is None or timeout <= 0:
        raise StoreError(f"invalid store timeout {timeout!r}: give seconds > 0")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "file":
        if tls is not None and any((tls.cafile, tls.certfile, tls.keyfile)):
            raise StoreError(f"TLS files were given for the file store {url}; they only apply to etcd stores")
        others = [item.partition("://")[0].strip().lower() for item in rest.split(",")[1:] if "://" in item]
        if others:
            other = others[0]
            raise StoreError(
                f"invalid store URL {url!r}: it mixes file:// and {other}:// endpoints; a file store "
                f"is one directory, and one store reaches all its members the same way"
            )
        if auth is not None:
            raise StoreError(f"an etcd user was given for the file store {url}; it only applies to etcd stores")
        if not rest.startswith("/"):
            raise StoreError(
                f"invalid store URL {url!r}: a file store needs an absolute directory, "
                f"as in file:///var/lib/pycni/cluster (three slashes)"
            )
        if "?" in rest or "#" in rest:
            raise StoreError(f"invalid store URL {url!r}: query strings and fragments are not supported")
        return FileStore(rest, timeout=timeout)
    if sep and scheme in ETCD_SCHEMES:
        return EtcdStore(
            parse_endpoints(url, rest, scheme), prefix=prefix, tls=tls, auth=auth, timeout=timeout, scheme=scheme
        )
    raise StoreError(f"unsupported store URL {url!r}: use {ACCEPTED_URLS}")
