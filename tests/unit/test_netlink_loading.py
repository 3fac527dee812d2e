"""cni_plugins.kernel.netlink: pyroute2 without its package-wide imports, full API still reachable."""

import subprocess
import sys


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_iproute_loads_without_the_package_init():
    run(
        "import sys\n"
        "from cni_plugins.kernel.netlink import IPRoute\n"
        "with IPRoute() as ipr:\n"
        "    assert ipr.link_lookup(ifname='lo')\n"
        "assert 'pyroute2.ndb' not in sys.modules and 'pyroute2.conntrack' not in sys.modules\n"
    )


def test_public_names_still_work_after_the_shortcut():
    run(
        "import cni_plugins.kernel.netlink\n"
        "from pyroute2 import IPRoute, NDB\n"
        "import pyroute2\n"
        "assert pyroute2.__version__\n"
        "from pyroute2.netlink.exceptions import NetlinkError\n"
        "with IPRoute() as ipr:\n"
        "    assert ipr.link_lookup(ifname='lo')\n"
    )


def test_an_earlier_full_import_is_left_alone():
    run(
        "import pyroute2\n"
        "full = pyroute2\n"
        "from cni_plugins.kernel.netlink import IPRoute\n"
        "import sys\n"
        "assert sys.modules['pyroute2'] is full and hasattr(full, 'NDB')\n"
    )
