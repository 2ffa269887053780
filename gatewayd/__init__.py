"""gatewayd: a pluggable SMTP/LMTP gateway that turns support mail into owned, tracked tickets.

Plugin authors import from :mod:`gatewayd.plugin` (the public API) and
:mod:`gatewayd.testing` (the test kit); everything else is the daemon's own.
"""

__version__ = "0.1.0"
