"""The checkpoint store: the store class (``store``), the one save transaction every format commits
through (``transaction``), the formats, one module each (``formats/``), the registry, the manifest record,
retention and durable file I/O. The store reads no environment variable (its callers pass the lock mode
and the job's ids); it never imports a format's internals, only the format table. The public names are
re-exported from ``hpcckpt``; these modules are private."""
