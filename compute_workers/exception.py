"""Errors of the compute worker, classified for the conductor.

``reschedule`` says whether another host could succeed where this one failed: an image whose bytes do
not match its checksum is as wrong everywhere (False), a hypervisor error is this host's (True). The
message of every error is written for the user who reads the instance's fault.
"""

from __future__ import annotations

from typing import ClassVar


class ComputeError(Exception):
    """Base of the worker's own errors; the message is shown to users as the fault message."""

    reschedule: ClassVar[bool] = True


class InvalidInstanceUUID(ComputeError, ValueError):
    """An instance uuid is not a canonical lower-case UUID (it names directories: never trust it)."""

    reschedule = False


class InstanceNotFound(ComputeError):
    """No domain of that instance exists on this host."""


class InstanceExists(ComputeError):
    """A domain of that instance already exists on this host."""


class InstanceInvalidState(ComputeError):
    """The domain is in a state the operation cannot start from (pause a shut-off instance)."""


class ConsoleUnavailable(ComputeError):
    """The instance exists but has no console log to read (yet)."""


class HypervisorError(ComputeError):
    """libvirt or QEMU failed on this host; another host may do better."""


class ImageDownloadError(ComputeError):
    """The image could not be fetched (network, image API, missing token); may work elsewhere."""


class ImageError(ComputeError):
    """The image itself is unusable: retrying on another host cannot help."""

    reschedule = False


class ImageNotFound(ImageError):
    """The image API answered 404 for the image."""


class ImageChecksumMismatch(ImageError):
    """The downloaded bytes do not hash to the sha256 in the spec."""


class ImageSizeMismatch(ImageError):
    """The download is not as long as the spec says."""


class ImageFormatError(ImageError):
    """The image is not of its declared disk format, or refers to other files (backing/data file)."""


class ImageTooLarge(ImageError):
    """The image's virtual size exceeds the flavor's root disk."""


class ImageURLRefused(ImageError):
    """The image URL of a task is not under the configured API URL (CLOUDCTL_API_URL): the service
    token is never sent there, on any host."""


class ImageUploadError(ComputeError):
    """The snapshot could not be uploaded: the image service refused it or could not be reached."""


class CPUIncompatible(ComputeError):
    """This host's CPU cannot run a guest live-migrated from the source's CPU (libvirt compareCPU)."""


class MigrationAborted(HypervisorError):
    """libvirt ended a live migration because its job was aborted (abortJob); the domain stays here."""


class PostCopyUnsupported(HypervisorError):
    """A live migration started with post-copy permitted failed at once: the destination's QEMU cannot
    do post-copy (it needs userfaultfd: ``vm.unprivileged_userfaultfd=1``, or QEMU running as root)."""
