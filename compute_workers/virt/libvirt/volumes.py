"""Copying one file between two libvirt hosts with storage volume streams: cold migration's disk copy.

Each side gets a transient ``dir`` storage pool over one directory (the source's ``<uuid>_resize``,
the destination's ``<uuid>``, built by the destination daemon); the file is downloaded from the
source volume and uploaded into a new volume of the destination pool, piped through this process
chunk by chunk over the two connections. Sparse streams: a hole travels as its length, not as
zeros, and is a hole again on the destination (the file keeps its size). The bytes are the file's
own: a qcow2 overlay arrives as the same qcow2, its backing file reference unchanged.

The same code copies between two daemons, or within one (both connections reach the same daemon: a
same-host resize, or storage the two hosts share). Nothing here needs a shell or a filesystem of the
other host: only its libvirt connection.

A transient pool disappears when it is destroyed (or when its daemon restarts); one left behind by a
process that died is found by its name prefix and target path and destroyed before a new pool takes
its directory (libvirt refuses two pools over one directory).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt

from compute_workers.exception import HypervisorError

LOG = logging.getLogger(__name__)

POOL_PREFIX = "cloudctl-"
# The largest data payload of one message of a libvirt RPC stream: a bigger send is split anyway.
CHUNK_SIZE = 256 * 1024
_SPARSE_REFUSED = (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG,
                   libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED)
# What recvFlags(STOP_AT_HOLE) answers when the stream is at a hole (libvirt's C API returns -3).
_AT_HOLE = -3


class PoolUnavailable(HypervisorError):
    """libvirt cannot make a pool over the directory (most often: it does not exist there)."""


@dataclass(frozen=True)
class VolumeCopy:
    size: int         # bytes of the file (holes included)
    sent: int         # bytes that travelled as data (holes excluded)
    seconds: float
    sparse: bool


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


def _pool_xml(name: str, path: Path) -> str:
    return (f"<pool type='dir'><name>{_escape(name)}</name><target><path>{_escape(str(path))}</path>"
            "<permissions><mode>0755</mode></permissions></target></pool>")


def _pool_path(pool: libvirt.virStoragePool) -> str | None:
    try:
        return ET.fromstring(pool.XMLDesc(0)).findtext("./target/path")
    except (libvirt.libvirtError, ET.ParseError):
        return None


def _destroy_stale_pools(conn: libvirt.virConnect, path: Path) -> None:
    """Destroy our own pools over ``path`` that a process which died left on that daemon."""
    try:
        pools = conn.listAllStoragePools(0)
    except libvirt.libvirtError as exc:
        LOG.warning("cannot list the storage pools of %s: %s", conn.getURI(), exc)
        return
    for pool in pools:
        with contextlib.suppress(libvirt.libvirtError):
            if pool.name().startswith(POOL_PREFIX) and _pool_path(pool) == str(path):
                LOG.warning("destroying storage pool %s over %s left by an earlier copy", pool.name(), path)
                if pool.isActive():
                    pool.destroy()
                if pool.isPersistent():
                    pool.undefine()


@contextlib.contextmanager
def transient_pool(conn: libvirt.virConnect, path: Path, *, build: bool, where: str
                   ) -> Iterator[libvirt.virStoragePool]:
    """A transient ``dir`` pool over ``path`` on ``conn``'s daemon, destroyed on leaving (the files
    stay). ``build``: the daemon creates the directory if missing. ``where`` names the host in errors."""
    _destroy_stale_pools(conn, path)
    name = f"{POOL_PREFIX}{path.name[:40]}-{secrets.token_hex(4)}"
    flags = libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD if build else 0
    try:
        pool = conn.storagePoolCreateXML(_pool_xml(name, path), flags)
    except libvirt.libvirtError as exc:
        raise PoolUnavailable(f"libvirt on {where} cannot open directory {path} as a storage pool: "
                              f"{_message(exc)}") from exc
    try:
        yield pool
    finally:
        try:
            pool.destroy()
        except libvirt.libvirtError as exc:
            LOG.warning("cannot destroy the transient storage pool %s on %s: %s", name, where, exc)


def _open_download(volume: libvirt.virStorageVol, conn: libvirt.virConnect) -> tuple[libvirt.virStream, bool]:
    """The stream of ``volume``'s bytes: sparse when the daemon can, else plain."""
    stream = conn.newStream(0)
    try:
        volume.download(stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
        return stream, True
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        if int(exc.get_error_code() or 0) not in _SPARSE_REFUSED:
            raise
        LOG.info("no sparse volume download on %s (%s): copying every byte", conn.getURI(), exc)
    stream = conn.newStream(0)
    volume.download(stream, 0, 0, 0)
    return stream, False


def _physical_size(volume: libvirt.virStorageVol) -> int:
    """The file's size in bytes (libvirt's "physical"; "capacity" is a qcow2's virtual size)."""
    return int(volume.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])


def _send_all(stream: libvirt.virStream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view))
        if sent <= 0:  # a blocking stream never answers -2
            raise HypervisorError(f"the destination stream accepted no data (answer {sent})")
        view = view[sent:]


def _pipe(source: libvirt.virStream, dest: libvirt.virStream, sparse: bool, size: int,
          progress: Callable[[int, int], None], deadline: float) -> int:
    """Move every chunk and hole from ``source`` to ``dest``; returns the data bytes sent."""
    done = sent = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        if sparse:
            data = source.recvFlags(CHUNK_SIZE, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
            if data == _AT_HOLE:
                hole = int(source.recvHole(0))
                dest.sendHole(hole, 0)
                done += hole
                progress(done, size)
                continue
        else:
            data = source.recv(CHUNK_SIZE)
        if isinstance(data, int):
            raise HypervisorError(f"unexpected answer {data} of the source stream")
        if not data:
            return sent
        _send_all(dest, data)
        done += len(data)
        sent += len(data)
        progress(done, size)


def copy_file(source_conn: libvirt.virConnect, source_dir: Path, dest_conn: libvirt.virConnect,
              dest_dir: Path, name: str, progress: Callable[[int, int], None], timeout: float, *,
              source_label: str = "the source", dest_label: str = "the destination") -> VolumeCopy:
    """Copy ``source_dir/name`` (on ``source_conn``'s host) to ``dest_dir/name`` (on ``dest_conn``'s
    host, which builds ``dest_dir`` if needed; an existing file of that name there is replaced).

    ``progress(bytes_done, bytes_total)`` is called after every chunk or hole. Raises HypervisorError
    (the message names the host and the step) when libvirt fails or ``timeout`` seconds pass; a
    partial destination file may then be left: :func:`remove_copy` removes it.
    """
    started = time.monotonic()
    deadline = started + timeout
    with transient_pool(source_conn, source_dir, build=False, where=source_label) as source_pool, \
            transient_pool(dest_conn, dest_dir, build=True, where=dest_label) as dest_pool:
        try:
            source_volume = source_pool.storageVolLookupByName(name)
            size = _physical_size(source_volume)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt on {source_label} cannot read {source_dir / name}: "
                                  f"{_message(exc)}") from exc
        dest_volume = _new_volume(dest_pool, name, dest_dir, dest_label)
        streams: list[libvirt.virStream] = []
        step = f"downloading {source_dir / name} from {source_label}"
        try:
            download, sparse = _open_download(source_volume, source_conn)
            streams.append(download)
            step = f"uploading to {dest_dir / name} on {dest_label}"
            upload = dest_conn.newStream(0)
            streams.append(upload)
            dest_volume.upload(upload, 0, 0, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM if sparse else 0)
            step = f"copying {source_dir / name} from {source_label} to {dest_label}"
            sent = _pipe(download, upload, sparse, size, progress, deadline)
            step = f"finishing the download from {source_label}"
            download.finish()
            streams.remove(download)
            step = f"finishing the upload to {dest_label}"
            upload.finish()  # returns once the destination daemon has written everything
            streams.remove(upload)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"{step} failed: {_message(exc)}") from exc
        except TimeoutError:
            raise HypervisorError(f"the copy of {source_dir / name} from {source_label} to {dest_label} "
                                  f"did not finish within {timeout:.0f} s") from None
        finally:
            for stream in streams:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
        try:
            copied = _physical_size(dest_volume)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt on {dest_label} cannot read the copy {dest_dir / name}: "
                                  f"{_message(exc)}") from exc
        if copied != size:
            raise HypervisorError(f"the copy {dest_dir / name} on {dest_label} has {copied} bytes, the "
                                  f"original {size}")
    return VolumeCopy(size=size, sent=sent, seconds=time.monotonic() - started, sparse=sparse)


def _new_volume(pool: libvirt.virStoragePool, name: str, directory: Path,
                where: str) -> libvirt.virStorageVol:
    """An empty file ``name`` in ``pool``, replacing one left by an earlier attempt. Created raw and
    empty: the upload writes the file's bytes as they are, whatever their format."""
    xml = (f"<volume><name>{_escape(name)}</name><capacity>0</capacity><target><format type='raw'/>"
           "<permissions><mode>0644</mode></permissions></target></volume>")
    try:
        with contextlib.suppress(libvirt.libvirtError):
            old = pool.storageVolLookupByName(name)
            LOG.warning("replacing %s on %s, left by an earlier copy", directory / name, where)
            old.delete(0)
        return pool.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"libvirt on {where} cannot create {directory / name}: "
                              f"{_message(exc)}") from exc


def remove_copy(conn: libvirt.virConnect, directory: Path, name: str, *, where: str) -> None:
    """Remove ``directory/name`` on ``conn``'s host, then ``directory`` itself if it is empty (what
    :func:`copy_file` made). A missing directory is fine; raises HypervisorError when libvirt refuses."""
    try:
        with transient_pool(conn, directory, build=False, where=where) as pool:
            try:
                pool.storageVolLookupByName(name).delete(0)
            except libvirt.libvirtError as exc:
                if int(exc.get_error_code() or 0) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise HypervisorError(f"libvirt on {where} cannot remove {directory / name}: "
                                          f"{_message(exc)}") from exc
    except PoolUnavailable as exc:
        LOG.info("nothing to remove in %s on %s: %s", directory, where, exc)
        return
    # Deleting a pool's directory needs a defined, inactive pool: define one for that only.
    try:
        pool = conn.storagePoolDefineXML(_pool_xml(f"{POOL_PREFIX}rm-{secrets.token_hex(4)}", directory), 0)
    except libvirt.libvirtError as exc:
        LOG.warning("cannot remove directory %s on %s: %s", directory, where, exc)
        return
    try:
        pool.delete(0)
    except libvirt.libvirtError as exc:  # not empty: someone else's files are there; leave them
        LOG.warning("directory %s on %s not removed: %s", directory, where, _message(exc))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            pool.undefine()
