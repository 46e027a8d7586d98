"""How a model runs: eagerly, compiled, or replayed from CUDA graphs.

Chosen once at the edge (a workflow or the command line) and handed to the algorithms as
ready objects, a model callable and an optimiser-step factory, so that no algorithm
branches on it (:mod:`hifi.execution.edge`; the machinery in :mod:`hifi.execution.fastpath`).
"""
