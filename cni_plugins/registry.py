
PLUGINS: dict[str, str] = {
    "host-local": "ipam.host_local:main",
    "loopback": "cni_plugins.loopback:main",
    "portmap": "cni_plugins.portmap:main",
    "bandwidth": "cni_plugins.bandwidth:main",
}
