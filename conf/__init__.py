"""Network configuration: find, load and validate .conflist/.conf files (libcni semantics).

Example configurations shipped with pycni live in ``conf/examples``.
"""

from .build import build_plugin_config, runtime_config
from .errors import ConfError, NetworkNotFoundError
from .loader import DEFAULT_CONF_DIR, conf_dirs, load_conflist, load_conflist_file
from .netconf import NetworkConfigList, check_plugin_type, parse_conflist, parse_single_conf

__all__ = [
    "ConfError",
    "DEFAULT_CONF_DIR",
    "NetworkConfigList",
    "NetworkNotFoundError",
    "build_plugin_config",
    "check_plugin_type",
    "conf_dirs",
    "load_conflist",
    "load_conflist_file",
    "parse_conflist",
    "parse_single_conf",
    "runtime_config",
]
