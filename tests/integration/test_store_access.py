"""Reaching the store the way flannel's operators do, against a real etcd (Debian's 3.4) in test namespaces.

flannel's --etcd-endpoints form (http://HOST:PORT,... and https://HOST:PORT,...),
an etcd with authentication enabled (--etcd-username, --etcd-password-file:
a token from /v3/auth/authenticate on every request and watch, renewed when
it expires), and the PYCNI_* environment variables for the store flags.
Root only: every etcd runs inside a namespace these tests create and is
stopped by its PID when its context manager exits, also on failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

import netns
from ipam.cluster import (
    ClusterConfig,
    StoreAuth,
    StoreError,
    StoreUnavailable,
    TLSFiles,
    acquire_lease,
    init_cluster,
    list_leases,
    open_store,
    read_config,
)
from tests.cluster_helpers import (
    auth_flags,
    enable_etcd_auth,
    etcd_in_netns,
    etcd_skip_reason,
    make_tls_certs,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
    pytest.mark.usefixtures("stays_in_its_namespace"),
]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")

MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"
PASSWORD = "pycni-etcd-pw"
TOKEN_TTL = 2  # seconds an idle simple token lives (etcd --auth-token-ttl)
# Warnings a command may log on stderr besides its one-line error.
_WARNINGS = ("is used without TLS", "does not have authentication enabled")


def _prefix() -> str:
    return f"/t/{os.urandom(4).hex()}"


def _open(member, url: str, **kwargs):
    with netns.enter(member.netns):
        return open_store(url, **kwargs)


def _cli(netns_path: str, group: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pycni cluster ...` or `pycni agent ...` as a process in the namespace; PYCNI_* only from env."""
    module = {"cluster": "pycni.cluster_cmd", "agent": "pycni.agent.cli"}[group]
    code = f"from {module} import {group}; {group}(prog_name='pycni {group}')"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYCNI_") and k != "SSL_CERT_FILE"}
    full_env.update(env or {})
    return subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not any(w in line for w in _WARNINGS)]


@pytest.fixture(scope="module")
def plain():
    with etcd_in_netns("sacc") as member:
        yield member


@pytest.fixture(scope="module")
def authed():
    """etcd with authentication on: user pycni may read and write /t/..., user other only /elsewhere/."""
    with etcd_in_netns("sauth", extra_args=auth_flags(TOKEN_TTL)) as member:
        enable_etcd_auth(member, {"pycni": (PASSWORD, "/t/"), "other": ("other-pw", "/elsewhere/")})
        yield member


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "etcd-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return str(path)


def _auth() -> StoreAuth:
    return StoreAuth("pycni", PASSWORD)


# -- flannel's --etcd-endpoints form ------------------------------------------------------------


def test_an_http_endpoint_list_reaches_etcd(plain):
    prefix = _prefix()
    url = f"http://127.0.0.1:1,http://{plain.endpoint}/"  # a dead member first, as flannel users list them
    store = _open(plain, url, prefix=prefix)
    try:
        assert store.url() == f"http://127.0.0.1:1,http://{plain.endpoint}"
        cfg = ClusterConfig("10.244.0.0/16")
        assert init_cluster(store, cfg)
        assert acquire_lease(store, cfg, "192.168.10.1", MAC_A).subnet == "10.244.0.0/24"
        assert store.current_endpoint.port == plain.client_port
    finally:
        store.close()
    done = _cli(plain.netns, "cluster", "leases", "--store", url, "--etcd-prefix", prefix, "--json")
    assert done.returncode == 0, done.stderr
    assert [lease["publicIP"] for lease in json.loads(done.stdout)["leases"]] == ["192.168.10.1"]


@needs_openssl
def test_an_https_endpoint_list_is_tls(tmp_path):
    certs = make_tls_certs(str(tmp_path / "pki"), ["127.0.0.1"])
    with etcd_in_netns("sahttps", tls=certs) as member:
        url = f"https://127.0.0.1:1,https://{member.endpoint}"
        good = _open(member, url, tls=certs.client_files())
        system_cas = _open(
            member,
            f"https://{member.endpoint}",
            timeout=2,
            tls=TLSFiles(certfile=certs.client_cert, keyfile=certs.client_key),
        )
        try:
            cfg = ClusterConfig("10.244.0.0/16")
            assert init_cluster(good, cfg)
            lease = acquire_lease(good, cfg, "192.168.11.1", MAC_A)
            entries, rev = good.list("subnets/")
            assert [e.key for e in entries] == [f"subnets/{lease.subnet.replace('/', '-')}"]
            # Without --etcd-cafile the system's trusted CAs verify etcd: they do not know the test CA.
            with pytest.raises(StoreUnavailable, match="certificate verification failed"):
                system_cas.get("config")
        finally:
            good.close()
            system_cas.close()
        # The system's trust store (OpenSSL reads SSL_CERT_FILE) with the test CA in it: no --etcd-cafile needed.
        done = _cli(
            member.netns,
            "cluster",
            "leases",
            "--store",
            url,
            "--etcd-certfile",
            certs.client_cert,
            "--etcd-keyfile",
            certs.client_key,
            "--json",
            env={"SSL_CERT_FILE": certs.ca},
        )
        assert done.returncode == 0, done.stderr
        assert [lease["publicIP"] for lease in json.loads(done.stdout)["leases"]] == ["192.168.11.1"]
        assert "without TLS" not in done.stderr
        # http:// is plain http: TLS files with it are a mistake, said as such.
        refused = _cli(
            member.netns, "cluster", "leases", "--store", f"http://{member.endpoint}", "--etcd-cafile", certs.ca
        )
        assert refused.returncode == 2 and "write its endpoints as https://HOST:PORT" in refused.stderr


def test_a_list_mixing_schemes_is_refused(plain):
    prefix = _prefix()
    for url, words in [
        (f"http://{plain.endpoint},https://{plain.endpoint}", "mixes http:// and https://"),
        (f"etcd://{plain.endpoint},http://{plain.endpoint}", "mixes etcd:// and http://"),
    ]:
        with pytest.raises(StoreError, match=words):
            open_store(url)
        done = _cli(
            plain.netns, "cluster", "init", "--store", url, "--etcd-prefix", prefix, "--network", "10.244.0.0/16"
        )
        assert done.returncode == 2 and words in done.stderr, done.stderr
    store = _open(plain, f"http://{plain.endpoint}", prefix=prefix)
    try:
        assert store.get("config") is None
    finally:
        store.close()


# -- an etcd user ------------------------------------------------------------------------------------


def test_cluster_init_and_leases_as_an_etcd_user(authed, password_file):
    prefix = _prefix()
    base = ["--store", authed.url, "--etcd-prefix", prefix]
    refused = _cli(authed.netns, "cluster", "init", *base, "--network", "10.60.0.0/16")
    assert refused.returncode == 1 and len(_errors(refused.stderr)) == 1, refused.stderr
    assert "etcd has authentication enabled: give an etcd user with --etcd-username" in refused.stderr
    done = _cli(
        authed.netns,
        "cluster",
        "init",
        *base,
        "--network",
        "10.60.0.0/16",
        "--etcd-username",
        "pycni",
        "--etcd-password-file",
        password_file,
    )
    assert done.returncode == 0, done.stderr
    assert "cluster initialised" in done.stdout
    env = {"PYCNI_ETCD_USERNAME": "pycni", "PYCNI_ETCD_PASSWORD_FILE": password_file}
    listed = _cli(authed.netns, "cluster", "leases", *base, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["config"]["Network"] == "10.60.0.0/16"


def test_a_wrong_password_or_unknown_user_is_a_one_line_error(authed, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    for user in ("pycni", "nobody"):
        done = _cli(
            authed.netns,
            "cluster",
            "leases",
            "--store",
            authed.url,
            "--etcd-prefix",
            _prefix(),
            "--etcd-username",
            user,
            "--etcd-password-file",
            str(wrong),
        )
        assert done.returncode == 1, done.stderr
        [error] = _errors(done.stderr)
        assert error.startswith(f"Error: etcd refused user '{user}': wrong password, or no such user")
        assert "--etcd-password-file" in error and "not-the-password" not in done.stderr


def test_a_group_readable_password_file_is_refused(authed, password_file):
    os.chmod(password_file, 0o640)
    done = _cli(
        authed.netns,
        "cluster",
        "leases",
        "--store",
        authed.url,
        "--etcd-username",
        "pycni",
        "--etcd-password-file",
        password_file,
    )
    assert done.returncode == 2 and "readable by group or others (mode 0640)" in done.stderr
    assert PASSWORD not in done.stderr


def test_an_overlay_lease_and_its_watch_as_an_etcd_user(authed):
    prefix = _prefix()
    a = _open(authed, authed.url, prefix=prefix, auth=_auth())
    b = _open(authed, authed.url, prefix=prefix, auth=_auth())
    try:
        cfg = ClusterConfig("10.244.0.0/16")
        assert init_cluster(a, cfg)
        mine = acquire_lease(a, cfg, "192.168.20.1", MAC_A, node_name="a")
        _, rev = list_leases(a)
        with a.watch("subnets/", rev) as watch:
            assert watch.next(0.2) == []  # the stream is up, with the token
            theirs = acquire_lease(b, cfg, "192.168.20.2", MAC_B, node_name="b")
            events = []
            for _ in range(20):
                events += watch.next(0.5)
                if events:
                    break
        assert [(e.kind, e.key) for e in events] == [("put", f"subnets/{theirs.subnet.replace('/', '-')}")]
        assert a.refresh(f"subnets/{mine.subnet.replace('/', '-')}")
        assert a.stats()["requests"]["authenticate"] == 1  # one token served every request and the watch
    finally:
        a.close()
        b.close()


def test_an_expired_token_is_renewed_for_requests_and_watches(authed):
    prefix = _prefix()
    a = _open(authed, authed.url, prefix=prefix, auth=_auth())
    b = _open(authed, authed.url, prefix=prefix, auth=_auth())
    try:
        cfg = ClusterConfig("10.244.0.0/16")
        assert init_cluster(a, cfg)
        acquire_lease(a, cfg, "192.168.21.1", MAC_A)
        _, rev = list_leases(a)
        watch = a.watch("subnets/", rev)
        try:
            assert watch.next(0.2) == []
            time.sleep(TOKEN_TTL + 2)  # a's token expires (etcd checks every second)
            # The open stream goes on: etcd checked the token when the watch was created.
            theirs = acquire_lease(b, cfg, "192.168.21.2", MAC_B)
            events = []
            for _ in range(20):
                events += watch.next(0.5)
                if events:
                    break
            assert [e.key for e in events] == [f"subnets/{theirs.subnet.replace('/', '-')}"]
        finally:
            watch.close()
        # A request with the expired token: etcd says "invalid auth token", the store authenticates again.
        assert read_config(a) == cfg
        assert a.stats()["requests"]["authenticate"] == 2
        # A watch created with an expired token: canceled by etcd, created again with a new token.
        _, rev = list_leases(a)
        time.sleep(TOKEN_TTL + 2)
        with a.watch("subnets/", rev) as again:
            assert again.next(0.5) == []
            b.delete(f"subnets/{theirs.subnet.replace('/', '-')}")
            events = []
            for _ in range(20):
                events += again.next(0.5)
                if events:
                    break
        assert [e.kind for e in events] == ["delete"]
        assert a.stats()["requests"]["authenticate"] == 3
    finally:
        a.close()
        b.close()


def test_a_user_without_the_prefix_is_told_what_to_grant(authed):
    store = _open(authed, authed.url, prefix=_prefix(), auth=StoreAuth("other", "other-pw"), timeout=2)
    try:
        with pytest.raises(
            StoreError,
            match=r"permission denied: the roles of etcd user 'other' do not grant it "
            r"/t/\w+/: grant one of them readwrite on the prefix",
        ):
            store.get("config")
        with store.watch("subnets/", 1) as watch:
            with pytest.raises(StoreUnavailable, match="permission denied.*'other'"):
                watch.next(1)
    finally:
        store.close()


def test_agent_leave_as_an_etcd_user(authed, password_file):
    prefix = _prefix()
    store = _open(authed, authed.url, prefix=prefix, auth=_auth())
    try:
        cfg = ClusterConfig("10.244.0.0/16")
        init_cluster(store, cfg)
        acquire_lease(store, cfg, "192.168.22.1", MAC_A)
    finally:
        store.close()
    done = _cli(
        authed.netns,
        "agent",
        "leave",
        "--store",
        authed.url,
        "--public-ip",
        "192.168.22.1",
        "--etcd-prefix",
        prefix,
        "--etcd-username",
        "pycni",
        "--etcd-password-file",
        password_file,
    )
    assert done.returncode == 0, done.stderr
    assert "released the lease of 192.168.22.1" in done.stdout


def test_credentials_for_an_etcd_without_authentication_are_not_needed(plain, caplog):
    store = _open(plain, plain.url, prefix=_prefix(), auth=_auth())
    try:
        with caplog.at_level(logging.WARNING, logger="pycni.store"):
            cfg = ClusterConfig("10.244.0.0/16")
            assert init_cluster(store, cfg)
            assert read_config(store) == cfg
        [warning] = [r.getMessage() for r in caplog.records if "authentication enabled" in r.getMessage()]
        assert "does not have authentication enabled: going on without a token" in warning
        assert store.stats()["requests"]["authenticate"] == 1  # asked once, then no more
    finally:
        store.close()


# -- PYCNI_* environment variables ----------------------------------------------------------------


def test_pycni_store_instead_of_the_flag(plain):
    prefix = _prefix()
    env = {"PYCNI_STORE": f"http://{plain.endpoint}", "PYCNI_ETCD_PREFIX": prefix}
    done = _cli(plain.netns, "cluster", "init", "--network", "10.70.0.0/16", env=env)
    assert done.returncode == 0, done.stderr
    assert f"cluster initialised in http://{plain.endpoint}" in done.stdout
    listed = _cli(plain.netns, "cluster", "leases", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["config"]["Network"] == "10.70.0.0/16"
    store = _open(plain, plain.url, prefix=prefix)
    try:
        assert read_config(store) == ClusterConfig("10.70.0.0/16")
    finally:
        store.close()


def test_authentication_turned_on_while_a_store_is_open():
    """The store found authentication off and went on without a token; etcd then asks for a user."""
    with etcd_in_netns("salate", extra_args=auth_flags(300)) as member:
        prefix = _prefix()
        store = _open(member, member.url, prefix=prefix, auth=_auth())
        try:
            cfg = ClusterConfig("10.244.0.0/16")
            assert init_cluster(store, cfg)
            assert store.stats()["requests"]["authenticate"] == 1  # "not enabled": no token
            enable_etcd_auth(member, {"pycni": (PASSWORD, "/t/")})
            assert read_config(store) == cfg  # "user name is empty": authenticate
            lease = acquire_lease(store, cfg, "192.168.23.1", MAC_A)
            key = f"subnets/{lease.subnet.replace('/', '-')}"
            with store.watch("subnets/", store.get(key).mod_revision - 1) as watch:  # replays the lease's put
                events = []
                for _ in range(20):
                    events += watch.next(0.5)
                    if events:
                        break
            assert [e.key for e in events] == [key]
            assert store.stats()["requests"]["authenticate"] == 2
        finally:
            store.close()
