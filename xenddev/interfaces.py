"""
The zope.interface contracts of xenddev.

Tests check implementations with C{verifyObject}. The XenStore layer's
contracts live in L{xenddev.xenstore.interfaces} and are re-exported here,
so code above the layer may import every contract from this module.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from xenddev.xenstore.interfaces import ITransaction, IWatchHandle, IXenStore, IXenStoreOps

__all__ = [
    "IActivationGuard",
    "IBuiltinScript",
    "IDevController",
    "IDriverDomainKind",
    "IHotplugRunner",
    "IMediumChanger",
    "INbdAttacher",
    "IPoolPeers",
    "IStorageMigration",
    "ITapCtl",
    "ITransaction",
    "IWatchHandle",
    "IXenStore",
    "IXenStoreOps",
    "IXenbusSimulator",
]


class IHotplugRunner(Interface):
    """Runs hotplug scripts (the real ones from /etc/xen/scripts) as processes."""

    def run(script, args, env):
        """
        Run C{script} (a name resolved inside the script directory) with the
        argument list C{args} and extra environment C{env}; no shell.

        Fires with a C{HotplugResult} on exit status 0; fails with
        C{HotplugScriptError} (non-zero exit: command, exit code, stderr and
        the backend's C{hotplug-error}) or C{HotplugTimeout} (the process
        group was killed).
        """


class IXenbusSimulator(Interface):
    """
    A stand-in for what cannot exist without a hypervisor: a kernel backend
    driver (blkback/netback) or a guest's frontend driver, playing its part
    of the xenbus state machine in XenStore.
    """

    def start():
        """Begin watching and reacting; a Deferred that fires when ready."""

    def stop():
        """Stop reacting and remove every watch; a Deferred."""


class IDriverDomainKind(Interface):
    """
    One way of serving targets in a driver domain (blkback, netback, tap,
    qemu). The agent calls these with a C{KindContext}; each returns a
    Deferred firing with an C{Outcome} (XenStore writes the agent applies
    in the same transaction as the result) or failing with C{KindError}
    (a Xen errno name and a message). Operations must be idempotent: after
    an agent crash a request is executed again with C{ctx.recovering} set.
    """

    name = Attribute("The name the kind is registered under in config.")
    objectClasses = Attribute("Object classes served: ('vdi',) or ('vif',).")

    def accepts(objectClass, target):
        """Whether this kind serves C{target} (a dict of t/* values)."""

    def prepare(ctx):
        """Create what the object needs (validate, allocate, spawn)."""

    def activate(ctx):
        """Let I/O flow (open, unpause)."""

    def deactivate(ctx):
        """Stop I/O (pause, close)."""

    def unprepare(ctx):
        """Release everything prepare created."""

    def plug(ctx, plug):
        """Serve C{plug.frontend}; the Outcome names the backend directory."""

    def unplug(ctx, plug):
        """Stop serving the plug (after its remove hotplug script ran)."""

    def hotplugCommand(ctx, device, action):
        """
        The hotplug script to run for a device, as C{(script, args, env)},
        or None if the kind needs none. C{action} is C{"add"} or C{"remove"}.
        """


class IMediumChanger(Interface):
    """
    A driver-domain kind that can replace a prepared object's target in
    place (the C{change} request: a cdrom's medium). Kinds that do not
    provide it answer C{change} with C{EOPNOTSUPP}.
    """

    def change(ctx, target, plugs):
        """
        Switch the object from C{ctx.target} to C{target} (validated t/*
        values) for C{plugs} (the plugged C{PlugSpec}s, backends set). Fires
        with an C{Outcome} for the backends (the agent replaces C{t/*} and
        re-runs the hotplug scripts itself) or fails with C{KindError};
        must check everything before the agent runs the old medium's remove
        scripts.
        """


class IDevController(Interface):
    """
    xend's device controller API for one device class of one guest; every
    method that touches XenStore returns a Deferred.
    """

    deviceClass = Attribute("The device class: vbd, vif, tap, tap2.")
    domid = Attribute("The guest domain.")

    def createDevice(config):
        """Create a device; fires with its devid once connected."""

    def destroyDevice(devid, force=False):
        """Destroy a device (see DestroyMode for a guest that never closes)."""

    def reconfigureDevice(devid, config):
        """Change a device in place (cdrom media change); fires with devid."""

    def getDeviceDetails(config):
        """Validate a configuration into DeviceDetails (nothing written)."""

    def getDeviceConfiguration(devid):
        """Fire with the device's configuration dict."""

    def configuration(devid):
        """Fire with the device's configuration as an s-expression."""

    def configurations():
        """Fire with every device's configuration s-expression."""

    def sxprs():
        """Fire with [devid, frontend keys] for each device."""

    def sxpr(devid):
        """xend's [class, ['dom', domid, 'id', devid]]."""

    def waitForDevice(devid):
        """Fire once the device's hotplug script has connected it."""

    def waitForDevices():
        """waitForDevice for every device of the class."""

    def waitForDevice_destroy(devid, backpath):
        """Fire once the backend directory is gone."""

    def backendPath(backdom, devid):
        """The backend directory in driver domain backdom."""

    def frontendRoot():
        """/local/domain/<domid>/device/<class>."""

    def frontendPath(devid):
        """The frontend directory of a device."""

    def devicePath(devid):
        """The toolstack's record of a device."""

    def deviceIDs():
        """Fire with the sorted device ids."""

    def allocateDeviceID():
        """Fire with a fresh id from device-misc/<class>/nextDeviceID."""

    def readBackend(devid, *keys):
        """Fire with the values of backend keys."""

    def readFrontend(devid, *keys):
        """Fire with the values of frontend keys."""

    def readVm(devid, *keys):
        """Fire with the values of record keys."""

    def writeBackend(devid, values):
        """Write backend keys in one transaction."""

    def convertToDeviceNumber(devid):
        """A device id from an int, 'class/NNN', a name (vbd) or a MAC (vif)."""

    def finishDeviceCleanup(backpath, path):
        """Class-specific cleanup after the backend is gone (a Deferred)."""

    def migrate(deviceConfig, network, dst, step, domName, recover=False):
        """
        xend's migration steps 0-3 on the source host (C{dst}: the
        destination host; with C{recover}, xend's C{recover_migrate}: undo
        after a failed step); fires with 0 on success.
        """


class ITapCtl(Interface):
    """
    Tapdisk control, as blktap's C{tap-ctl} offers it (see
    C{xenddev.tapctl}); every method returns a Deferred and fails with
    C{TapCtlError} (command, exit code, stderr).
    """

    def list(pid=None, minor=None, type=None, path=None):
        """Fire with the tapdisks (C{TapdiskInfo}), optionally filtered."""

    def allocate():
        """Allocate a minor; fire with its device node."""

    def free(minor):
        """Release a minor."""

    def create(args, readonly=False):
        """allocate + spawn + attach + open C{<type>:<path>}; fire with the node."""

    def destroy(pid, minor):
        """close + detach + free; the tapdisk process exits."""

    def spawn():
        """Start a tapdisk process; fire with its pid."""

    def attach(pid, minor):
        """Attach a tapdisk to a minor."""

    def detach(pid, minor):
        """Detach a tapdisk from a minor."""

    def open(pid, minor, args, readonly=False):
        """Open the image C{<type>:<path>}."""

    def close(pid, minor, force=False):
        """Close the image."""

    def pause(pid, minor):
        """Pause I/O."""

    def unpause(pid, minor, args=None):
        """Resume I/O; with C{args}, reopen on new parameters."""

    def stats(pid, minor):
        """Fire with the tapdisk's statistics (text)."""


class INbdAttacher(Interface):
    """Connects kernel block devices to NBD exports on UNIX sockets."""

    def attach(socketPath, export, readOnly):
        """
        Connect a free device to export C{export} of the server on
        C{socketPath}; fire with its path (C{/dev/nbdN}).

        @raise xenddev.driverdomain.nbd.NbdError: (in the Deferred) naming
            what failed.
        """

    def detach(device):
        """Disconnect C{device}; nothing if it is not connected."""

    def attached(device):
        """Whether C{device} is connected to a server."""


class IBuiltinScript(Interface):
    """A hotplug script done in process (see L{xenddev.driverdomain.hotplug.HotplugRunner})."""

    def run(args, env):
        """
        Do what the script does for C{args} with environment C{env}; a
        Deferred firing when done, or failing with an exception whose
        C{message} (and C{status}: C{error} or C{busy}) it also wrote to
        C{hotplug-error} (and C{hotplug-status}).
        """


class IActivationGuard(Interface):
    """
    Who may use a storage target (seed 000: "no two vdis for the same
    target will simultaneously be active"): one host's rule from the
    toolstack's records, or a pool's over etcd. The toolstack consults it
    before anything of an attach is written and gives back what it was
    granted at detach and rollback; the daemon's wiring injects it.
    """

    def acquire(claim):
        """
        Take C{claim} (a L{xenddev.toolstack.activation.Claim}); fires with
        a C{Grant} (the normalised target, the fencing token), or fails
        with C{ActivationConflict} (fault 12) naming who holds the target,
        or with fault 16 when the pool cannot be asked. Nothing is written
        to XenStore either way.
        """

    def release(grant):
        """
        Give back C{grant} (a detach, a rollback); fires when done, never
        fails (what could not be given back is logged).
        """

    def where(target):
        """
        Fires with who holds C{target} (a path, C{file:PATH} or
        C{dev:MAJOR:MINOR}) as plain data: C{target} (normalised),
        C{writer}, C{readers} (hosts), C{devices} (this host's).
        """

    def hosts():
        """
        Fires with the hosts the guard's answers span, as plain data (this
        host alone without a pool).
        """


class IPoolPeers(Interface):
    """
    The other hosts' daemons of a pool, asked over their XML-RPC faces
    (L{xenddev.poolpeers}).
    """

    timeout = Attribute("Seconds one call may take in all.")

    def address(host):
        """Fires with the URL C{host}'s daemon advertises (fault 16 if none or not live)."""

    def call(host, method, *args):
        """
        Call C{method} on C{host}'s daemon; fires with its answer, or fails
        with C{PeerFault} (its refusal, with its fault code) or
        C{PeerUnavailable} (fault 16: not asked, unreachable, or timed out).
        """


class IStorageMigration(Interface):
    """
    The storage side of migrating a guest to another host of the pool, as
    xend's migration steps ask for it on the source (C{xenddev.poolmigration}):
    the device controllers of storage classes call it from C{migrate}.
    """

    def step(domid, dst, step, domName, recover=False):
        """
        Do step C{step} (0 check, 1 prepare on C{dst}, 2 hand over, 3
        finish) of guest C{domid}'s migration to host C{dst}, where it is
        named C{domName}; with C{recover}, undo after a failed step. Done
        once per guest and step however many of its devices ask; fires
        with 0, or fails with a typed error.
        """
