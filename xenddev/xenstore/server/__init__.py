"""
The embedded xenstored: a XenStore server on Twisted.

It speaks the XenStore wire protocol on any stream endpoint (normally a UNIX
socket) and behaves like the C xenstored of Xen 4.17: the same tree, path
rules, permissions, watches, transactions, quotas and errno values. Modules:

 - L{quota}: the configurable limits (C xenstored 4.17 defaults);
 - L{tree}: nodes, interned permission sets, the global tree;
 - L{transaction}: per-transaction overlays and commit;
 - L{watches}: watch registration and matching;
 - L{core}: the operations (what each request does) and domains;
 - L{protocol}: the Twisted protocol and factories (privileged or bound to a
   domid);
 - L{persistence}: saving and loading the tree;
 - L{service}: a Twisted service listening on the sockets.

Typical in-process use::

    server = XenStoreServer(reactor=reactor)
    port = reactor.listenUNIX(path, XenStoreServerFactory(server))
    guest = reactor.listenUNIX(path5, XenStoreServerFactory(server, domid=5))
"""

from xenddev.xenstore.server.core import XenStoreServer
from xenddev.xenstore.server.protocol import XenStoreServerFactory, XenStoreServerProtocol
from xenddev.xenstore.server.quota import Quotas

__all__ = ["Quotas", "XenStoreServer", "XenStoreServerFactory", "XenStoreServerProtocol"]
