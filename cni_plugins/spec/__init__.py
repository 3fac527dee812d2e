"""The CNI contract: errors, versions, CNI_ARGS, result types, the plugin skeleton,
executing a delegated plugin and the registry of this suite's plugins.

Imports only the standard library and ``netns``; everything else in the suite builds on it.
"""
