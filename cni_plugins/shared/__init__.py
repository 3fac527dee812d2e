"""Pieces several plugins share: IPAM delegation, container-interface setup,
masquerading and the MAC spoof check.

Imports ``spec`` and ``kernel``; never a plugin package.
"""
