"""The adapter store: folder layout and atomic writes, the registry, verified reads, loading an adapter."""
