"""twistd plugin: C{twistd xenddev} runs the xenddev daemon."""

from twisted.application.service import ServiceMaker

xenddev = ServiceMaker(
    "xenddev",
    "xenddev.daemon",
    "Xen device controllers with an XML-RPC API (xenddev daemon).",
    "xenddev",
)
