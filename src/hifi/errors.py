"""The one exception type the library raises for a user's mistake or missing resource.

The command line turns it into a single line on stderr and a non-zero exit; an embedding
product catches it and shows ``str(err)``.
"""

from __future__ import annotations


class HifiError(Exception):
    """A problem the user can fix: bad input, a missing model, an incompatible run."""


class ModelNotFoundError(HifiError):
    """A model (weights or config) could not be found locally and the hub is unreachable."""
