"""Every plugin this suite provides: CNI type name -> "module:function" entry point."""

PLUGINS: dict[str, str] = {
    "bridge": "cni_plugins.bridge:main",
    "host-local": "ipam.host_local:main",
    "loopback": "cni_plugins.loopback:main",
    "portmap": "cni_plugins.portmap:main",
    "bandwidth": "cni_plugins.bandwidth:main",
}
