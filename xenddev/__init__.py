"""xenddev: Xend-style Xen device controllers on Twisted.

The package is layered: L{xenddev.xenstore} knows bytes and paths, the
driver-domain protocol sits above it, and the controllers above that.
"""

__version__ = "0.1.0"
