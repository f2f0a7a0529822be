"""
Device controllers (vbd, tap, tap2, vif) built on L{xenddev.toolstack.controller}.

The folder is the checkout's top-level C{controllers/}, installed (and
linked in the checkout) as C{xenddev.controllers}, so site-packages gets no
generic top-level C{controllers} package. Only the daemon's wiring imports
this package: it hands L{defaultControllers} to the L{DeviceManager}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xenddev.toolstack.controller import DevController


def defaultControllers() -> dict[str, type[DevController]]:
    """The controller class for each device class this build supports."""
    from xenddev.controllers.blkif import BlkifController
    from xenddev.controllers.blktap import Blktap2Controller, BlktapController
    from xenddev.controllers.vif import VifController

    return {
        "vbd": BlkifController,
        "tap": BlktapController,
        "tap2": Blktap2Controller,
        "vif": VifController,
    }
