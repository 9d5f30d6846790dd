"""Live migration of a running domain with libvirt peer-to-peer migration.

The source daemon connects to the destination daemon itself (``dest_uri``, e.g.
``qemu+tcp://<dest>/system``) and QEMU streams memory (and, for block migration, the disk) to
``dest_migrate_uri`` (e.g. ``tcp://<dest>``). The domain is persisted on the destination and
undefined here only when libvirt reports success; on failure it keeps running here.

Block migration (``NON_SHARED_DISK``) needs the destination prepared first: the instance directory
and an empty qcow2 of the same virtual size at the same path (the destination worker's job).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import libvirt

BASE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
              | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@dataclass(frozen=True)
class MigrationResult:
    seconds: float  # wall-clock time of the migration call


def migration_flags(block_migration: bool) -> int:
    return BASE_FLAGS | (libvirt.VIR_MIGRATE_NON_SHARED_DISK if block_migration else 0)


def migration_params(dest_migrate_uri: str | None) -> dict[str, str]:
    return {} if not dest_migrate_uri else {libvirt.VIR_MIGRATE_PARAM_URI: dest_migrate_uri}


def live_migrate(domain: libvirt.virDomain, dest_uri: str, dest_migrate_uri: str | None,
                 block_migration: bool) -> MigrationResult:
    """Migrate ``domain`` (running) to ``dest_uri``; raises libvirtError when libvirt refuses or fails."""
    started = time.monotonic()
    domain.migrateToURI3(dest_uri, migration_params(dest_migrate_uri), migration_flags(block_migration))
    return MigrationResult(seconds=time.monotonic() - started)
