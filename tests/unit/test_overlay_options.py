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
    done = run("--store", "file:///tmp/x", "--public-ip", "10.0.0.5", "--state-dir", "/run/x", "--bridge", "br9",
               "--vxlan-device", "vx9", "--underlay-device", "eth9", "--node-name", "n9", "--lease-ttl", "30",
               "--reconcile-interval", "2", "--disable-tx-checksum-offload", "--no-ip-masq", "--etcd-prefix", "/p")
    assert done.exit_code == 0, done.output
    assert done.output.strip() == repr(OverlayOptions(
        store_url="file:///tmp/x", public_ip="10.0.0.5", state_dir="/run/x", etcd_prefix="/p", bridge="br9",
        vxlan_device="vx9", underlay_device="eth9", node_name="n9", tx_checksum_offload=False, ip_masq=False,
        lease_ttl=30, reconcile_interval=2.0))


@pytest.mark.parametrize("args, words", [
    (("--store", "file:///tmp/x"), "--store needs --public-ip"),
    (("--public-ip", "10.0.0.5"), "--public-ip is for overlay mode: give --store too"),
    (("--no-ip-masq", "--node-name", "n1"), "--no-ip-masq, --node-name are for overlay mode"),
    (("--store", "file:///tmp/x", "--public-ip", "10.0.0.5", "--lease-ttl", "2"), "--lease-ttl"),
])
def test_usage_errors_say_what_is_missing(args, words):
    done = run(*args)
    assert done.exit_code == 2 and words in done.output, done.output
