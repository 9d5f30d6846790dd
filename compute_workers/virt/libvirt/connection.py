"""The libvirt driver's connection: one per driver, shared by every worker thread (libvirt connections
are thread-safe and libvirt-python releases the GIL during calls), reopened if libvirtd went away;
and the lifecycle events registered on it, dispatched by libvirt's event loop in a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import libvirt

from compute_workers import contract
from compute_workers.exception import HypervisorError
from compute_workers.virt.driver import checked_uuid, instance_uuid_of
from compute_workers.virt.libvirt import guest
from compute_workers.virt.libvirt.errors import error_code, hypervisor_errors

LOG = logging.getLogger(__name__)


def ignore_libvirt_errors(_ctx: object, _error: object) -> None:
    """libvirt prints every error on stderr by default; ours are raised and logged instead."""


def alive(conn: libvirt.virConnect) -> bool:
    """Whether ``conn`` still reaches its daemon."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:  # closed
        return False


_event_loop_lock = threading.Lock()
_event_loop_running = False


def _run_event_loop() -> None:
    while True:
        try:
            if libvirt.virEventRunDefaultImpl() < 0:
                LOG.error("libvirt event loop iteration failed")
                time.sleep(1)
        except Exception:
            LOG.exception("libvirt event loop iteration failed")
            time.sleep(1)


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process.

    Lifecycle events (and keepalives) of a connection are dispatched by the event loop registered
    when it was opened: this must come before :func:`libvirt.open`.
    """
    global _event_loop_running
    with _event_loop_lock:
        if _event_loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_running = True


class Connection:
    """The connection to the daemon at ``uri``, opened on first use and again after it was lost.

    A lifecycle callback, once registered, is registered again on every new connection, and after a
    reconnect it hears of every instance (events may have been missed meanwhile)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._lifecycle_callback: Callable[[str], None] | None = None
        self._events_conn: libvirt.virConnect | None = None
        self._event_callback_id = -1

    @property
    def current(self) -> libvirt.virConnect | None:
        """The connection opened last, alive or not, without reconnecting; None before the first."""
        return self._conn

    def get(self) -> libvirt.virConnect:
        """The open connection; reconnects (and registers the events again) if it was lost."""
        with self._lock:
            if self._conn is not None and alive(self._conn):
                return self._conn
            lost = self._conn
            if lost is not None:
                LOG.warning("libvirt connection to %s lost; reconnecting", self.uri)
            with hypervisor_errors(f"cannot connect to libvirt at {self.uri}"):
                self._conn = libvirt.open(self.uri)
            if lost is not None:
                self._deregister_events(lost)
                with contextlib.suppress(libvirt.libvirtError):
                    lost.close()
            if self._lifecycle_callback is not None:
                try:
                    self._register_events(self._conn)
                except HypervisorError as exc:  # the caller's operation need not fail for it
                    LOG.error("%s: power states reach the conductor only with the heartbeat", exc)
                if lost is not None:
                    self._notify_all(self._conn)
            return self._conn

    def register_lifecycle_callback(self, callback: Callable[[str], None] | None) -> None:
        start_event_loop()
        with self._lock:
            self._lifecycle_callback = callback
            conn = self._conn
            if conn is None or not alive(conn):
                return  # the next connection registers it
            if callback is None:
                self._deregister_events(conn)
            elif self._events_conn is not conn:
                self._register_events(conn)

    def _register_events(self, conn: libvirt.virConnect) -> None:
        """Called with _lock held, on a connection opened after the event loop started."""
        with hypervisor_errors("cannot register for libvirt lifecycle events"):
            self._event_callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle_event, None)
        self._events_conn = conn
        try:
            conn.registerCloseCallback(self._on_connection_closed, None)
        except libvirt.libvirtError as exc:  # only a log line is lost
            LOG.debug("no close callback on %s: %s", self.uri, exc)

    def _deregister_events(self, conn: libvirt.virConnect) -> None:
        registered = self._events_conn
        if registered is None or registered is not conn:
            return
        self._events_conn = None
        with contextlib.suppress(libvirt.libvirtError):
            registered.domainEventDeregisterAny(self._event_callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            registered.unregisterCloseCallback()

    def _on_lifecycle_event(self, _conn: libvirt.virConnect, domain: libvirt.virDomain, event: int,
                            detail: int, _opaque: object) -> None:
        """Runs on libvirt's event thread: hand the uuid over, never block, never raise."""
        try:
            instance_uuid = instance_uuid_of(domain.name())
            callback = self._lifecycle_callback
            if instance_uuid is None or callback is None:
                return
            LOG.debug("lifecycle event %s (detail %s) of instance %s", event, detail, instance_uuid)
            callback(instance_uuid)
        except Exception:
            LOG.exception("lifecycle event handler failed")

    def _on_connection_closed(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        LOG.warning("libvirt connection to %s closed (reason %s): events stop until the next call "
                    "reconnects (the heartbeat makes one every few seconds)", self.uri, reason)

    def _notify_all(self, conn: libvirt.virConnect) -> None:
        """After a reconnect: events may have been missed, so every instance counts as changed."""
        callback = self._lifecycle_callback
        if callback is None:
            return
        try:
            names = [domain.name() for domain in conn.listAllDomains(0)]
        except libvirt.libvirtError as exc:
            LOG.warning("cannot list domains after reconnecting: %s", exc)
            return
        for name in names:
            instance_uuid = instance_uuid_of(name)
            if instance_uuid is not None:
                callback(instance_uuid)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._lifecycle_callback = None
            if conn is None:
                return
            self._deregister_events(conn)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def power_state_at(uri: str, instance_uuid: str) -> str | None:
    """The power state of the instance's domain at another daemon (read-only), None if it has none."""
    name = contract.domain_name(checked_uuid(instance_uuid))
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot reach the hypervisor at {uri}: "
                              f"{exc.get_error_message() or exc}") from exc
    try:
        try:
            domain = conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot look up instance {instance_uuid} at {uri}: {exc}") from exc
        with hypervisor_errors(f"cannot read the state of instance {instance_uuid} at {uri}"):
            return guest.power_state(domain)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
