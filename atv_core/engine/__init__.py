"""The serving engine: requests, scheduler, model runner, sampler, the engine loop and its builder.

Imports torch; knows nothing of HTTP (see server/) or of training (see tools/)."""
