"""Steering pieces shared by training and serving: decoder-layer lookup, injection hooks, the generator,
its checkpoints. Knows nothing of requests or scheduling."""
