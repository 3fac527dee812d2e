"""Shared scaffolding for pycni's tests.

- ``netenv``: throwaway namespaces. A ``Node`` stands in for a host (its own
  namespace, IPAM data dir, cache dir and network config dir); a ``Pod`` stands
  in for a container. Both are made through the project's ``netns`` library
  with tagged names (``pt-<role>-<8 hex>``) and removed when their context
  closes, also when a test fails. ``sh`` runs a host tool with a timeout.
- ``plugins``: ``run_plugin`` runs a plugin executable as a real process with
  the CNI environment and stdin (inside a node namespace when given) and
  returns an ``Outcome``; ``launchers`` writes executables for our plugins;
  ``REFERENCE_DIR`` is where the reference Go plugins live.
- ``state``: what a namespace looks like: links, addresses, routes, sysctls,
  nftables and iptables rules, tc qdiscs.

The fixtures built on these (``make_node``, ``make_pod``, ``node``,
``launcher_dir``) live in ``tests/conftest.py``.
"""
