"""
The data-path registry and the storage control operations built on it
(seed 002): find every process serving an image or any image of its
backing chain, across driver domains; quiesce and resume them; coalesce.

  - L{registry}: records under C{/local/domain/<dd>/private/xenddev/datapath/<vdi>},
    L{scanRegistry}, L{findDataPaths};
  - L{quiesce}: L{DataPathControl} (quiesce → handle → resume), the
    L{IDataPathPauser} interface per kind, L{QemuPauser}, L{TapPauser},
    L{standardPausers};
  - L{remote}: L{remote.ProtocolPauser}, pausing through the driver
    domain's agent (not imported here: it depends on the protocol client);
  - L{coalesce}: live qemu commit, and quiesce-merge-resume for tapdisks;
  - L{images}: C{qemu-img info --backing-chain}.
"""

from xenddev.backendctrl.records import (
    DataPath,
    findDataPaths,
    holdPath,
    readRecord,
    recordPath,
    registryDir,
    scanDriverDomain,
    scanRegistry,
)
from xenddev.datapath.coalesce import (
    CoalesceError,
    coalesceQemu,
    coalesceQuiesced,
    mergeIntoParent,
)
from xenddev.datapath.images import ImageError, ImageInfo, imageChain
from xenddev.datapath.quiesce import (
    DataPathControl,
    IDataPathPauser,
    NoPauserError,
    QemuPauser,
    QuiesceError,
    QuiesceHandle,
    ResumeError,
    TapPauser,
    standardPausers,
)

__all__ = [
    "CoalesceError",
    "DataPath",
    "DataPathControl",
    "IDataPathPauser",
    "ImageError",
    "ImageInfo",
    "NoPauserError",
    "QemuPauser",
    "QuiesceError",
    "QuiesceHandle",
    "ResumeError",
    "TapPauser",
    "coalesceQemu",
    "coalesceQuiesced",
    "findDataPaths",
    "holdPath",
    "imageChain",
    "mergeIntoParent",
    "readRecord",
    "recordPath",
    "registryDir",
    "scanDriverDomain",
    "scanRegistry",
    "standardPausers",
]
