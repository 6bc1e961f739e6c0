"""Training: the class-conditional DiT train loop and the in-domain classifier."""
