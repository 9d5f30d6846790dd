"""The resource limits under which ``qemu-img`` reads an untrusted image, as Nova's
``QEMU_IMG_LIMITS`` (address space 1 GiB, 30 s of CPU): a crafted header (a huge L1 or refcount
table, a deep backing chain) makes qemu-img fail within them instead of eating the host.

Pure constants, no I/O: the compute workers (``compute_workers.images``) and the control plane's
upload inspection (``cloudctl.images.services``) both import them, so the two sides cannot drift.
"""

from __future__ import annotations

GiB = 1024 ** 3

QEMU_IMG_ADDRESS_SPACE = 1 * GiB
QEMU_IMG_CPU_SECONDS = 30


def prlimit_argv(address_space: int = QEMU_IMG_ADDRESS_SPACE,
                 cpu_seconds: int = QEMU_IMG_CPU_SECONDS) -> tuple[str, ...]:
    """``prlimit --as=<bytes> --cpu=<seconds> --``: the prefix of a command run under the limits
    (prlimit sets them, then executes the command in its place)."""
    return ("prlimit", f"--as={address_space}", f"--cpu={cpu_seconds}", "--")


QEMU_IMG_PRLIMIT = prlimit_argv()
