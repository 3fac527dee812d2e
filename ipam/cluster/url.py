"""Opening the cluster store a URL names: file:///DIR or etcd://HOST:PORT[,HOST:PORT...]."""
from __future__ import annotations

from .errors import StoreError
from .etcd import EtcdStore, parse_endpoints
from .filestore import FileStore
from .store import ACCEPTED_URLS, Store, TLSFiles


def open_store(url: str, *, prefix: str = "/pycni", tls: TLSFiles | None = None, timeout: float = 5.0) -> Store:
    """Open the cluster store at url.

    file:///DIR opens a local file store in DIR (created if missing; prefix
    does not apply: the directory is the store). etcd://HOST:PORT[,HOST:PORT...]
    talks to etcd v3 through its JSON gateway, trying the endpoints in order;
    with tls it uses https (without it, one warning per process: see
    EtcdStore). timeout bounds every request (seconds), and how long a file
    store waits for its lock.

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
            raise StoreError(f"TLS files were given for the file store {url}; they only apply to etcd:// URLs")
        if not rest.startswith("/"):
            raise StoreError(f"invalid store URL {url!r}: a file store needs an absolute directory, "
                             f"as in file:///var/lib/pycni/cluster (three slashes)")
        if "?" in rest or "#" in rest:
            raise StoreError(f"invalid store URL {url!r}: query strings and fragments are not supported")
        return FileStore(rest, timeout=timeout)
    if sep and scheme == "etcd":
        return EtcdStore(parse_endpoints(url, rest), prefix=prefix, tls=tls, timeout=timeout)
    raise StoreError(f"unsupported store URL {url!r}: use {ACCEPTED_URLS}")
