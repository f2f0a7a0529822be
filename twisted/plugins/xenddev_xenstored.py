"""twistd plugin: C{twistd xenstored} runs the embedded xenstored."""

from twisted.application.service import ServiceMaker

xenstored = ServiceMaker(
    "xenddev xenstored",
    "xenddev.xenstore.tap",
    "The embedded XenStore server (xenddev), on a UNIX socket.",
    "xenstored",
)
