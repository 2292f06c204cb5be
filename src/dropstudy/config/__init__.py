"""The config: schema, checks, composition, and the one module that touches Hydra's internals."""
