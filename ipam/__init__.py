"""IP address management: the host-local plugin, its allocator and its on-disk store."""
