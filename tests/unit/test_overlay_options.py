"""The overlay's one front door: `pycni agent`'s flags fill one OverlayOptions, with the defaults in one place."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from pycni.overlay.options import DEFAULT_LEASE_TTL, OverlayOptions, from_flags, overlay_flags


@click.command()
@overlay_flags
@click.pass_context
def probe(ctx: click.Context, leave: bool, **flags) -> None:
    click.echo(repr(from_flags(ctx, **flags)))


def run(*args: str):
    return CliRunner().invoke(probe, list(args))


def test_without_store_there_is_no_overlay():
    done = run()
    assert done.exit_code == 0 and done.output.strip() == "None"


def test_the_flags_fill_one_typed_object_with_the_dataclass_defaults():
    done = run("--store", "file:///tmp/x", "--public-ip", "10.0.0.5")
    assert done.exit_code == 0, done.output
    assert done.output.strip() == repr(OverlayOptions(store_url="file:///tmp/x", public_ip="10.0.0.5"))
    assert OverlayOptions("s", "p").lease_ttl == DEFAULT_LEASE_TTL


def test_every_flag_reaches_the_object():
    done = run(
        "--store",
        "file:///tmp/x",
        "--public-ip",
        "10.0.0.5",
        "--state-dir",
        "/run/x",
        "--bridge",
        "br9",
        "--vxlan-device",
        "vx9",
        "--underlay-device",
        "eth9",
        "--node-name",
        "n9",
        "--lease-ttl",
        "30",
        "--reconcile-interval",
        "2",
        "--disable-tx-checksum-offload",
        "--no-ip-masq",
        "--etcd-prefix",
        "/p",
    )
    assert done.exit_code == 0, done.output
    assert done.output.strip() == repr(
        OverlayOptions(
            store_url="file:///tmp/x",
            public_ip="10.0.0.5",
            state_dir="/run/x",
            etcd_prefix="/p",
            bridge="br9",
            vxlan_device="vx9",
            underlay_device="eth9",
            node_name="n9",
            tx_checksum_offload=False,
            ip_masq=False,
            lease_ttl=30,
            reconcile_interval=2.0,
        )
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (("--store", "file:///tmp/x"), "--store needs --public-ip"),
        (("--public-ip", "10.0.0.5"), "--public-ip is for overlay mode: give --store too"),
        (("--no-ip-masq", "--node-name", "n1"), "--no-ip-masq, --node-name are for overlay mode"),
        (("--store", "file:///tmp/x", "--public-ip", "10.0.0.5", "--lease-ttl", "2"), "--lease-ttl"),
    ],
)
def test_usage_errors_say_what_is_missing(args, words):
    done = run(*args)
    assert done.exit_code == 2 and words in done.output, done.output


# -- environment variables and the etcd user ------------------------------------------------------


def test_the_agent_flags_come_from_pycni_variables():
    env = {
        "PYCNI_STORE": "file:///tmp/x",
        "PYCNI_PUBLIC_IP": "10.0.0.5",
        "PYCNI_PUBLIC_IPV6": "fd00::5",
        "PYCNI_NODE_NAME": "n5",
        "PYCNI_ETCD_PREFIX": "/p5",
    }
    done = CliRunner().invoke(probe, [], env=env)
    assert done.exit_code == 0, done.output
    assert done.output.strip() == repr(
        OverlayOptions(
            store_url="file:///tmp/x", public_ip="10.0.0.5", public_ipv6="fd00::5", node_name="n5", etcd_prefix="/p5"
        )
    )
    # A flag wins over its variable.
    done = CliRunner().invoke(probe, ["--public-ip", "10.0.0.6", "--node-name", "n6"], env=env)
    assert "public_ip='10.0.0.6'" in done.output and "node_name='n6'" in done.output


def test_a_variable_without_a_store_is_named_in_the_usage_error():
    done = CliRunner().invoke(probe, [], env={"PYCNI_NODE_NAME": "n5", "PYCNI_STORE": ""})
    assert done.exit_code == 2 and "--node-name (from $PYCNI_NODE_NAME) is for overlay mode" in done.output


def test_the_etcd_user_reaches_the_object_and_its_password_stays_hidden(tmp_path):
    from ipam.cluster import StoreAuth

    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    done = run(
        "--store",
        "etcd://10.0.0.1:2379",
        "--public-ip",
        "10.0.0.5",
        "--etcd-username",
        "pycni",
        "--etcd-password-file",
        str(password),
    )
    assert done.exit_code == 0, done.output
    assert "auth=StoreAuth(username='pycni')" in done.output and "s3cret" not in done.output

    captured = []

    @click.command()
    @overlay_flags
    @click.pass_context
    def keep(ctx: click.Context, leave: bool, **flags) -> None:
        captured.append(from_flags(ctx, **flags))

    env = {"PYCNI_ETCD_USERNAME": "pycni", "PYCNI_ETCD_PASSWORD_FILE": str(password)}
    done = CliRunner().invoke(keep, ["--store", "https://10.0.0.1:2379", "--public-ip", "10.0.0.5"], env=env)
    assert done.exit_code == 0, done.output
    assert captured[0].auth == StoreAuth("pycni", "s3cret")


def test_the_agent_help_names_its_variables():
    output = run("--help").output
    for name in (
        "PYCNI_STORE",
        "PYCNI_PUBLIC_IP",
        "PYCNI_PUBLIC_IPV6",
        "PYCNI_NODE_NAME",
        "PYCNI_ETCD_USERNAME",
        "PYCNI_ETCD_PASSWORD_FILE",
        "PYCNI_ETCD_CAFILE",
    ):
        assert name in output, name
