"""Memory-access traces shipped with batchmmu (``trace = "bundled:NAME"``)."""
