"""Every plugin this suite provides: CNI type name -> "module:function" entry point."""

PLUGINS: dict[str, str] = {
    "loopback": "cni_plugins.loopback:main",
}
