"""Support for the end-to-end suites: real runtimes (containerd's CRI, podman, cnitool) running
pycni's plugins or the reference ones, each inside a test "host" (a network namespace plus a private
mount namespace of its own), never in the machine's root network namespace.

- ``host``       the host namespace pair, the "outside" namespace linked to it, running commands there
- ``procs``      starting and stopping processes strictly by PID (and finding the ones a runtime left)
- ``capture``    a logging wrapper per plugin: what a runtime really sends on stdin and in CNI_*
- ``image``      a busybox image built offline from Debian's busybox-static
- ``conflist``   the network every suite uses: bridge + portmap + bandwidth, host-local IPAM
- ``shaping``    reading tbf rates on host veths and ifb devices
- ``leftovers``  leases, veths, ifbs, qdiscs, rules, cache entries and netns pins left behind
- ``rootns``     what pycni or a test could change in the root network namespace, to prove none of it changed
- ``plugins``    the plugin directories under test (reference /usr/lib/cni, pycni install)
- ``cri``, ``containerd``, ``podman``, ``cnitool``: the runtimes
"""
