"""The test bed's Redis: every URL the tests, the benchmarks and the stacks they start use, made from
the one password cloudctl uses (:func:`compute_workers.credentials.redis_password`: REDIS_PASSWORD,
else the state dir's ``redis.password`` that ``tools/services.sh`` generates)."""

from __future__ import annotations

import os
from pathlib import Path

from compute_workers import credentials
from testbed import REPO

REDIS = "127.0.0.1:6379"


def redis_password() -> str:
    state_dir = Path(os.environ.get("CLOUDCTL_STATE_DIR") or REPO / "var")
    return credentials.redis_password(os.environ, state_dir)


def redis_url(db: int) -> str:
    """``redis://:<password>@127.0.0.1:6379/<db>`` (no password part when Redis has none)."""
    return credentials.redis_url(f"redis://{REDIS}/{db}", redis_password())


def redis_cli_env() -> dict[str, str]:
    """The environment of a ``redis-cli`` run: the password in REDISCLI_AUTH, not on its command line."""
    password = redis_password()
    return {**os.environ, "REDISCLI_AUTH": password} if password else dict(os.environ)
