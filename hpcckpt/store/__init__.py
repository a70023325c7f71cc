"""The checkpoint store: the store class, the registry, the manifest record, formats, retention and
durable file I/O. The public names are re-exported from ``hpcckpt``; these modules are private."""
