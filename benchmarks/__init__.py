"""Speed and memory benchmarks (``nox -s bench`` or ``python -m benchmarks.run``)."""
