"""The bench: every method and its peers at matched compute, scored with `calicache.metrics`."""
