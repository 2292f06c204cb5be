"""Training: the loop (`loop.Engine`), the one backend (`backend.Backend`), the batching rules."""
