"""`pycni conformance`: check the Kubernetes network model on a live cluster.

Every node runs ``pycni conformance run``: it attaches probe pods through the
CNI network (runtime.py's code path, as a container runtime would), starts an
echo service that reports the address it sees, publishes itself in the
cluster store, meets the other nodes there, checks pod and node connectivity
against all of them and writes its rows back to the store;
``pycni conformance report`` prints the matrix.

    model       what is published and the matrix rows
    facts       what this node's kernel holds for the overlay (FDB, neighbours, routes, firewall)
    diagnose    naming the likely fault of a failed check
    echo        the echo service (a child process)
    client      TCP, UDP and ICMP exchanges from a namespace
    probe       probe pods through the CNI runtime, and their record
    rendezvous  publishing, meeting and waiting in the store
    checks      the checks
    runner      one node's run and the clean-up
    report      the matrix as a table and as JSON
    cli         the click commands
"""
