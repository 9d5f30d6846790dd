"""``python -m cloudctl.flower [flower options]``: Celery's Flower, never without a login.

Flower serves every task's arguments (server ids, image ids, the service token's users) and can
revoke tasks and shut workers down; it starts open when ``FLOWER_BASIC_AUTH`` is unset. This
wrapper refuses to start it then, with the reason, and otherwise runs ``celery -A cloudctl flower``
with the options given. Flower reads ``FLOWER_BASIC_AUTH`` from the environment itself (its
``FLOWER_*`` variables are its options): the password is not put on the command line, which every
local user can read in ``ps``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

EXIT_NO_AUTH = 78  # EX_CONFIG: systemd does not restart a unit that exits with it (see the unit)


def basic_auth_problem(environ: Mapping[str, str]) -> str | None:
    """Why ``FLOWER_BASIC_AUTH`` cannot protect Flower, or None when every entry is
    ``user:password`` with both parts non-empty (Flower takes a comma-separated list)."""
    raw = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if not raw:
        return "FLOWER_BASIC_AUTH is not set"
    for entry in raw.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            return "FLOWER_BASIC_AUTH must be user:password (a comma-separated list of them)"
    return None


def flower_argv(args: Sequence[str]) -> list[str]:
    """The same Python (the venv's, whatever PATH says) runs Celery's command line."""
    return [sys.executable, "-m", "celery", "-A", "cloudctl", "flower", *args]


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    problem = basic_auth_problem(environ)
    if problem is not None:
        print(f"cloudctl: Flower not started: {problem}. It would serve the task monitor (and its "
              "revoke and shutdown buttons) to anyone who reaches its port. Set FLOWER_BASIC_AUTH="
              "user:password (`make run` generates one into $CLOUDCTL_STATE_DIR/cloudctl.env).",
              file=sys.stderr)
        return EXIT_NO_AUTH
    command = flower_argv(sys.argv[1:] if argv is None else argv)
    os.execvp(command[0], command)
    return 0  # not reached: execvp replaces the process


if __name__ == "__main__":
    sys.exit(main())
