"""The warm path: `pycni agent` serves CNI requests for the installed plugin shims.

A plugin process pays for Python's start-up on every call. The agent is one
resident process per node that keeps the plugin code imported and serves
requests that the shims `pycni install` writes forward over a root-only unix
socket: environment, stdin and the caller's network namespace (as a file
descriptor) in; exit code, stdout and stderr out, relayed byte for byte.

- ``protocol``: the wire format both ends speak (the shim has its own copy,
  written with the smallest standard-library pieces).
- ``shim``: the executable `pycni install` writes for each plugin.
- ``server``: the agent: socket, peer check, bounded concurrency, timeouts,
  namespace switch, statistics, graceful shutdown.
- ``client``: ``pycni agent status`` and tests talk to a running agent.
- ``cli``: the ``pycni agent`` command (also the overlay node agent with --store).
"""
