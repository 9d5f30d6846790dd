"""Django settings for cloudctl. Every value comes from an environment variable (see README).

A malformed value stops start-up with :class:`cloudctl.env.ImproperlyConfiguredEnv` naming the
variable.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import time
from pathlib import Path

import dj_database_url

from cloudctl.env import (
    ImproperlyConfiguredEnv,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
)
from cloudctl.files import create_private_file, private_dir, private_file
from compute_workers import contract, credentials

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = Path(env_str("CLOUDCTL_STATE_DIR", str(BASE_DIR / "var")))
# 0700: it holds the secret key, the SQLite database, cloudctl.env (narrowed here when older).
private_dir(STATE_DIR)
private_file(STATE_DIR / "cloudctl.env")  # written by tools/run.sh; 0644 before it created it 0600


def _persistent_secret(variable: str, file_name: str) -> str:
    """Environment variable ``variable``, else a random secret generated once into
    STATE_DIR/``file_name`` (created 0600 with O_EXCL: of processes starting together, one writes
    and the others wait for and read what it wrote)."""
    configured = env_str(variable, "")
    if configured:
        return configured
    path = STATE_DIR / file_name
    create_private_file(path, secrets.token_urlsafe(50))
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.1)  # another process created it and is writing it
    raise ImproperlyConfiguredEnv(variable, "", f"a value, or a non-empty file {path}")


SECRET_KEY = _persistent_secret("CLOUDCTL_SECRET_KEY", "secret_key")
DEBUG = env_bool("CLOUDCTL_DEBUG", False)
ALLOWED_HOSTS = env_list("CLOUDCTL_ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
# Behind a reverse proxy that terminates TLS (deploy/nginx/cloudctl.conf): trust its
# X-Forwarded-Proto, so that Django knows the request was HTTPS (the admin's CSRF origin check), and
# send the session and CSRF cookies over HTTPS only.
if env_bool("CLOUDCTL_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's JS/CSS served from here: no CDN needed
    "django_celery_results",
    "cloudctl.identity",
    "cloudctl.quotas",
    "cloudctl.images",
    "cloudctl.compute",
    "cloudctl.network",
]

MIDDLEWARE = [
    # First: a database outage anywhere below (a view, another middleware) answers 503, not 500.
    "cloudctl.database.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # admin CSS/JS under gunicorn, no nginx needed
    # Django's, but a session not saved for a database outage is the outage's 503 (not a 400).
    "cloudctl.database.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "cloudctl.urls"
WSGI_APPLICATION = "cloudctl.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite (WAL, busy timeout, IMMEDIATE transactions so that two writers serialise at
# BEGIN instead of failing on upgrade) unless DATABASE_URL names another, e.g. PostgreSQL.
_database_url = env_str("DATABASE_URL", f"sqlite:///{STATE_DIR / 'cloudctl.sqlite3'}")
try:
    _default_db = dj_database_url.parse(_database_url, conn_max_age=60)
except Exception as exc:  # dj_database_url raises several types for malformed URLs
    raise ImproperlyConfiguredEnv("DATABASE_URL", _database_url, f"a database URL ({exc})") from None
if _default_db["ENGINE"] == "django.db.backends.sqlite3":
    _default_db["CONN_MAX_AGE"] = 0
    _default_db["OPTIONS"] = {
        "timeout": env_int("CLOUDCTL_SQLITE_TIMEOUT", 30, minimum=1),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    Path(_default_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before SQLite creates it with the umask (an empty file is an empty database;
    # its -wal and -shm files take the database's mode).
    if _default_db["NAME"] != ":memory:":
        create_private_file(Path(_default_db["NAME"]))
    # Tests use a file too: an in-memory database locks whole tables instead of waiting.
    _default_db["TEST"] = {"NAME": str(Path(_default_db["NAME"]).with_suffix(".test.sqlite3"))}
else:
    # A persistent connection (CONN_MAX_AGE) that the server dropped while it sat idle (a restart,
    # a failover) is checked before its first query of each request or task and replaced, instead
    # of failing that query: requests after an outage succeed at once.
    _default_db["CONN_HEALTH_CHECKS"] = True
    # Seconds a connection attempt may take (libpq waits forever by default): while the database
    # host is unreachable, requests answer 503 after this long instead of hanging. A
    # ?connect_timeout= in DATABASE_URL wins.
    _default_db.setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT", 5, minimum=1))
DATABASES = {"default": _default_db}
# The Retry-After (seconds) of the API's 503 while the database cannot be reached.
DATABASE_RETRY_AFTER = env_int("DATABASE_RETRY_AFTER", 5, minimum=1)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Applied where a password is set through the API (users/), an interactive createsuperuser and bootstrap.
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = STATE_DIR / "static"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("CLOUDCTL_LOG_LEVEL", "INFO")},
}

# --- Limits: no request can exhaust the service --------------------------------------------------
# A list answers at most this many items when the request gives no limit, and never more than the
# maximum (a larger limit is clamped, as Nova's max_limit).
API_LIST_DEFAULT_LIMIT = env_int("API_LIST_DEFAULT_LIMIT", 1000, minimum=1)
API_LIST_MAX_LIMIT = env_int("API_LIST_MAX_LIMIT", 1000, minimum=1)
# A JSON request body larger than this is refused with 413 (image data excepted: IMAGE_SIZE_CAP).
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "cloudctl.identity.authentication.ServiceTokenAuthentication",
        "cloudctl.identity.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["cloudctl.identity.permissions.IsAuthenticatedUser"],
    # JSON only, at most API_MAX_BODY_BYTES (image data has its own endpoint and IMAGE_SIZE_CAP).
    "DEFAULT_PARSER_CLASSES": ["cloudctl.api.BoundedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "cloudctl.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Every list is paged (?limit=&marker=, a Link header to the next page), lists written by hand
    # included (cloudctl.api.paginated).
    "DEFAULT_PAGINATION_CLASS": "cloudctl.api.MarkerPagination",
    "PAGE_SIZE": API_LIST_DEFAULT_LIMIT,
}

# OpenAPI 3 schema at /api/v1/schema/, Swagger UI at /api/v1/docs/ (both readable without a token).
SPECTACULAR_SETTINGS = {
    "TITLE": "cloudctl",
    "VERSION": "1.0.0",
    "DESCRIPTION": (
        "A small OpenStack-Nova-like virtual-machine manager. Get a token with "
        "`POST /api/v1/auth/token/` and send it as `Authorization: Token <token>`. "
        "Server actions are asynchronous: they answer 202 with the action record; "
        "a server in a state that forbids the action answers 409 with its status, "
        "vm_state and task_state."
    ),
    "SERVE_INCLUDE_SCHEMA": False,
    # One name for the identity roles wherever they appear (a member's role, a token's roles).
    "ENUM_NAME_OVERRIDES": {"RoleEnum": "cloudctl.identity.models.Role.choices"},
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Enum names as usual, then the 415 and 413 answers of every operation that takes a body, then
    # the Link header (and the 400) of every paged list, then the 404 of every path with a parameter,
    # then every operation's 503 of a database outage.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "cloudctl.api.document_unsupported_media_type",
                             "cloudctl.api.document_body_limits",
                             "cloudctl.api.document_paged_lists",
                             "cloudctl.api.document_not_found",
                             "cloudctl.api.document_database_unavailable"],
    # Security schemes come from the authentication classes: tokenAuth (`Authorization: Token
    # <key>`, described in cloudctl/api.py) and cookieAuth (the admin's session).
}

# --- Identity ---------------------------------------------------------------------------------------
# Seconds an API token lives (Keystone's default: 12 hours).
TOKEN_TTL = env_int("TOKEN_TTL", 43200, minimum=60)
# A username with LOGIN_FAILURE_LIMIT failed logins in the last LOGIN_FAILURE_WINDOW seconds gets 429
# (API token and /admin/login/) until the oldest of them is that old.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10, minimum=1)
LOGIN_FAILURE_WINDOW = env_int("LOGIN_FAILURE_WINDOW", 60, minimum=1)

# --- cloudctl -------------------------------------------------------------------------------------
# The base URL compute workers use to download images (GET /api/v1/images/<id>/file).
CLOUDCTL_API_URL = env_str("CLOUDCTL_API_URL", "http://127.0.0.1:8000").rstrip("/")
# Shared secret that compute workers present to download images; empty disables service access.
CLOUDCTL_SERVICE_TOKEN = env_str("CLOUDCTL_SERVICE_TOKEN", "")
IMAGES_PATH = Path(env_str("IMAGES_PATH", str(STATE_DIR / "image-store")))
# Where image bytes are kept: "local" (the directory IMAGES_PATH) is the backend there is.
IMAGE_STORE = env_choice("IMAGE_STORE", "local", ["local"])
# Bytes an image's data may have (as Glance's image_size_cap): a larger upload is refused with 413,
# its staging file removed and the image killed.
IMAGE_SIZE_CAP = env_int("IMAGE_SIZE_CAP", 20 * 1024 ** 3, minimum=1)
# Seconds an upload (image status saving) may go without receiving data before the reaper kills the
# image and removes its staging file: the uploading client or web process is gone. At least the time
# qemu-img may take to inspect the data (two calls of cloudctl.images.services.QEMU_IMG_TIMEOUT).
IMAGE_SAVING_DEADLINE = env_int("TASK_DEADLINE_IMAGE_SAVING", 600, minimum=180)

SCHEDULER_MAX_ATTEMPTS = env_int("SCHEDULER_MAX_ATTEMPTS", 3, minimum=1)
SCHEDULER_ENABLED_FILTERS = env_list(
    "SCHEDULER_ENABLED_FILTERS",
    ["RetryFilter", "AvailabilityZoneFilter", "ComputeFilter", "RamFilter", "DiskFilter",
     "CoreFilter", "ComputeCapabilitiesFilter", "ImagePropertiesFilter",
     "ServerGroupAffinityFilter", "ServerGroupAntiAffinityFilter", "SameHostFilter",
     "DifferentHostFilter"],
)
SCHEDULER_WEIGHERS = env_list("SCHEDULER_WEIGHERS", [
    "RAMWeigher", "CPUWeigher", "DiskWeigher", "ServerGroupSoftAffinityWeigher",
    "ServerGroupSoftAntiAffinityWeigher"])
SCHEDULER_RAM_WEIGHT_MULTIPLIER = env_float("SCHEDULER_RAM_WEIGHT_MULTIPLIER", 1.0)
SCHEDULER_CPU_WEIGHT_MULTIPLIER = env_float("SCHEDULER_CPU_WEIGHT_MULTIPLIER", 1.0)
SCHEDULER_DISK_WEIGHT_MULTIPLIER = env_float("SCHEDULER_DISK_WEIGHT_MULTIPLIER", 1.0)
# The group weighers must outweigh the resource weighers to mean anything (as Nova's defaults).
SCHEDULER_SOFT_AFFINITY_WEIGHT_MULTIPLIER = env_float("SCHEDULER_SOFT_AFFINITY_WEIGHT_MULTIPLIER",
                                                      10.0, minimum=0.0)
SCHEDULER_SOFT_ANTI_AFFINITY_WEIGHT_MULTIPLIER = env_float(
    "SCHEDULER_SOFT_ANTI_AFFINITY_WEIGHT_MULTIPLIER", 10.0, minimum=0.0)
# Pick at random among the best N hosts, so concurrent requests spread instead of colliding.
SCHEDULER_HOST_SUBSET_SIZE = env_int("SCHEDULER_HOST_SUBSET_SIZE", 1, minimum=1)
CPU_ALLOCATION_RATIO = env_float("CPU_ALLOCATION_RATIO", 16.0, minimum=0.0)
RAM_ALLOCATION_RATIO = env_float("RAM_ALLOCATION_RATIO", 1.5, minimum=0.0)
DISK_ALLOCATION_RATIO = env_float("DISK_ALLOCATION_RATIO", 1.0, minimum=0.0)
DEFAULT_AVAILABILITY_ZONE = env_str("DEFAULT_AVAILABILITY_ZONE", "nova")
# A host is "up" while its last heartbeat is younger than this many seconds.
SERVICE_DOWN_TIME = env_int("SERVICE_DOWN_TIME", 60, minimum=1)
# Seconds an instance may stay in BUILD before the reaper puts it in ERROR.
INSTANCE_BUILD_TIMEOUT = env_int("INSTANCE_BUILD_TIMEOUT", 900, minimum=10)
# Seconds a server may stay spawning before a heartbeat of its host that shows its domain running
# (and no spawn running for it there) completes the build, as the spawn report lost on the way would
# have (cloudctl.compute.sync.complete_builds); likewise a delete whose domain the heartbeat no longer
# lists is finished (complete_deletes).
BUILD_REPORT_GRACE = env_float("BUILD_REPORT_GRACE", 30.0, minimum=0.0)
# Seconds after which a build's message counts as lost and is sent once more (both are idempotent):
# a server still scheduling (its schedule_instance died with a killed scheduler, which Redis gives back
# only after its visibility timeout), or spawning while its host's heartbeats, read since, neither list
# its domain nor run anything for it (a scheduler killed between its claim and the spawn's send).
BUILD_RESEND_AFTER = env_float("BUILD_RESEND_AFTER", 60.0, minimum=1.0)
# Seconds a guest gets to shut down after the ACPI request before it is forced off (stop).
CLEAN_SHUTDOWN_TIMEOUT = env_int("CLEAN_SHUTDOWN_TIMEOUT", 60, minimum=0)
# --- Migration and resize --------------------------------------------------------------------------
# A live migration is aborted when it runs longer than this many seconds per GiB of guest RAM (plus
# the disk's GiB for a block migration), as Nova's live_migration_completion_timeout.
LIVE_MIGRATION_COMPLETION_TIMEOUT = env_int("LIVE_MIGRATION_COMPLETION_TIMEOUT", 800, minimum=1)
# Seconds the pre-flight task (scheduler worker) waits for each check answer of a compute worker.
MIGRATION_PRECHECK_TIMEOUT = env_float("MIGRATION_PRECHECK_TIMEOUT", 30.0, minimum=0.1)
# Destinations tried (pre-flight checks) when the scheduler picks one, before giving up.
MIGRATION_MAX_ATTEMPTS = env_int("MIGRATION_MAX_ATTEMPTS", 3, minimum=1)
# A host evacuation (live-migrate-servers) sends at most this many of its migrations to the
# pre-flight checks and the hosts at once; the others wait (status "accepted") for one to end.
EVACUATION_MAX_SERVERS = env_int("EVACUATION_MAX_SERVERS", 2, minimum=1)
# A resize may stay on its host (the scheduler may pick it).
ALLOW_RESIZE_TO_SAME_HOST = env_bool("ALLOW_RESIZE_TO_SAME_HOST", True)
# Seconds after which an unconfirmed resize (VERIFY_RESIZE) is confirmed automatically; 0: never.
RESIZE_CONFIRM_WINDOW = env_int("RESIZE_CONFIRM_WINDOW", 86400, minimum=0)
# Seconds one step of a migration (prepare, finish, confirm, revert; the live job has its own
# deadline) may take before the reaper ends the migration truthfully.
MIGRATION_STEP_TIMEOUT = env_int("MIGRATION_STEP_TIMEOUT", 900, minimum=5)
# --- A dead host: fencing and evacuation -----------------------------------------------------------
# The command that powers a dead host off (an IPMI or PDU call, say): split as a shell would (shlex),
# "{host}" replaced by the host's name in each argument, run without a shell; exit 0 means the host is
# off, and it is forced down. Empty: no fencing command (an admin forces dead hosts down by hand).
HOST_FENCE_COMMAND = env_str("HOST_FENCE_COMMAND", "")
try:
    shlex.split(HOST_FENCE_COMMAND)
except ValueError as _error:
    raise ImproperlyConfiguredEnv("HOST_FENCE_COMMAND", HOST_FENCE_COMMAND,
                                  f"a command line shlex can split ({_error})") from None
# Seconds the fencing command may run before it is killed (the attempt failed).
HOST_FENCE_TIMEOUT = env_float("HOST_FENCE_TIMEOUT", 30.0, minimum=0.1)
# Seconds between two runs of the periodic task that fences dead hosts and auto-evacuates them.
HOST_FENCE_INTERVAL = env_float("HOST_FENCE_INTERVAL", 10.0, minimum=1.0)
# Seconds before a failed fencing attempt of a host is tried again.
HOST_FENCE_RETRY_INTERVAL = env_float("HOST_FENCE_RETRY_INTERVAL", 60.0, minimum=1.0)
# Evacuate the servers of a fenced (forced down) dead host automatically, as the system.
AUTO_EVACUATE = env_bool("AUTO_EVACUATE", False)
# ... also the servers whose root disk is on the dead host's private storage (rebuilt from their image,
# their disk's data lost). False: only those a host sharing the storage can take with their disk.
AUTO_EVACUATE_ALLOW_DATA_LOSS = env_bool("AUTO_EVACUATE_ALLOW_DATA_LOSS", False)

# Seconds an operation may keep a server in a task state before the reaper ends it truthfully.
TASK_DEADLINES = {
    "rebooting": env_int("TASK_DEADLINE_REBOOTING", 300, minimum=1),
    "rebooting_hard": env_int("TASK_DEADLINE_REBOOTING_HARD", 180, minimum=1),
    "powering_off": env_int("TASK_DEADLINE_POWERING_OFF", 180, minimum=1),
    "powering_on": env_int("TASK_DEADLINE_POWERING_ON", 180, minimum=1),
    "pausing": env_int("TASK_DEADLINE_PAUSING", 60, minimum=1),
    "unpausing": env_int("TASK_DEADLINE_UNPAUSING", 60, minimum=1),
    "suspending": env_int("TASK_DEADLINE_SUSPENDING", 600, minimum=1),
    "resuming": env_int("TASK_DEADLINE_RESUMING", 600, minimum=1),
    "deleting": env_int("TASK_DEADLINE_DELETING", 300, minimum=1),
    "image_snapshot": env_int("TASK_DEADLINE_IMAGE_SNAPSHOT", 1800, minimum=1),
    "image_uploading": env_int("TASK_DEADLINE_IMAGE_UPLOADING", 1800, minimum=1),
}
# Seconds the API waits for a compute worker to answer a console-output call.
CONSOLE_OUTPUT_TIMEOUT = env_float("CONSOLE_OUTPUT_TIMEOUT", 10.0, minimum=0.1)

# --- Networks -------------------------------------------------------------------------------------


def _vni_range(name: str, default: str) -> tuple[int, int]:
    """``first:last`` VXLAN network identifiers (1..16777215), first <= last."""
    raw = env_str(name, default)
    try:
        first, last = (int(part) for part in raw.split(":"))
    except ValueError:
        raise ImproperlyConfiguredEnv(name, raw, "first:last, two integers") from None
    if not 1 <= first <= last <= 16777215:
        raise ImproperlyConfiguredEnv(name, raw, "1 <= first <= last <= 16777215")
    return first, last


# VNIs new vxlan networks get (the lowest free first); an administrator may give one outside it.
NETWORK_VNI_RANGE = _vni_range("NETWORK_VNI_RANGE", "1000:1999")
# The MTU of the hosts' physical network: a flat network's maximum, a vxlan network's minus the 50
# bytes of VXLAN encapsulation (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8), as Neutron's
# global_physnet_mtu.
NETWORK_PHYSICAL_MTU = env_int("NETWORK_PHYSICAL_MTU", 1500, minimum=1280)
# The network node: the host whose compute worker runs the routers (a qrouter-<router> namespace
# each: interfaces, gateway, SNAT, floating IPs) and, unless NETWORK_DHCP_HOST says otherwise, the
# networks' DHCP servers (dnsmasq in a qdhcp-<network> namespace). Router and floating-IP ports are
# bound to it. Defaults to the host name the Procfile's compute worker uses: COMPUTE_HOST when set
# (`COMPUTE_HOST=hv1 make run` gives every process that environment), else this machine's name.
NETWORK_NODE_HOST = env_str("NETWORK_NODE_HOST", env_str("COMPUTE_HOST", "") or socket.gethostname())
NETWORK_DHCP_HOST = env_str("NETWORK_DHCP_HOST", NETWORK_NODE_HOST)
# How long a DHCP lease lasts (dnsmasq's lease time).
NETWORK_DHCP_LEASE_SECONDS = env_int("NETWORK_DHCP_LEASE_SECONDS", 86400, minimum=120)
# Seconds between two whole-state syncs of every up host that holds a port
# (compute.network_host_sync): what a lost message or a worker that ignored one left behind converges
# within it.
NETWORK_RESYNC_INTERVAL = env_int("NETWORK_RESYNC_INTERVAL", 60, minimum=1)

# --- Quotas ---------------------------------------------------------------------------------------
# Each project's default limits (administrators override them per project: PATCH
# /api/v1/quotas/<project>/); -1 is unlimited. Nova's and Neutron's defaults where they have one.
QUOTA_INSTANCES = env_int("QUOTA_INSTANCES", 10, minimum=-1)
QUOTA_CORES = env_int("QUOTA_CORES", 20, minimum=-1)
QUOTA_RAM = env_int("QUOTA_RAM", 51200, minimum=-1)  # MiB
QUOTA_SERVER_GROUPS = env_int("QUOTA_SERVER_GROUPS", 10, minimum=-1)
QUOTA_SERVER_GROUP_MEMBERS = env_int("QUOTA_SERVER_GROUP_MEMBERS", 10, minimum=-1)  # per group
QUOTA_KEYPAIRS = env_int("QUOTA_KEYPAIRS", 100, minimum=-1)  # per user
QUOTA_IMAGES = env_int("QUOTA_IMAGES", 100, minimum=-1)
QUOTA_IMAGE_BYTES = env_int("QUOTA_IMAGE_BYTES", 100 * 1024**3, minimum=-1)
QUOTA_NETWORKS = env_int("QUOTA_NETWORKS", 100, minimum=-1)
QUOTA_PORTS = env_int("QUOTA_PORTS", 500, minimum=-1)
QUOTA_ROUTERS = env_int("QUOTA_ROUTERS", 10, minimum=-1)
QUOTA_FLOATING_IPS = env_int("QUOTA_FLOATING_IPS", 50, minimum=-1)
QUOTA_SECURITY_GROUPS = env_int("QUOTA_SECURITY_GROUPS", 10, minimum=-1)
QUOTA_SECURITY_GROUP_RULES = env_int("QUOTA_SECURITY_GROUP_RULES", 100, minimum=-1)

# --- Compute hosts' credentials --------------------------------------------------------------------
# The Redis password: REDIS_PASSWORD, else STATE_DIR/redis.password (tools/services.sh generates it).
# It goes into every Redis URL below (compute_workers.credentials.redis_url) unless a URL names its own.
REDIS_PASSWORD = credentials.redis_password(os.environ, STATE_DIR)
# Host keys are HMAC(CLOUDCTL_HOST_KEY_SECRET, "host:<name>:<generation>"): `manage.py host_credentials`.
CLOUDCTL_HOST_KEY_SECRET = _persistent_secret("CLOUDCTL_HOST_KEY_SECRET", "host_key_secret")
# A report signed further than this from the conductor's clock is dropped (replays, wrong clocks).
REPORT_MAX_SKEW = env_float("REPORT_MAX_SKEW", credentials.DEFAULT_MAX_SKEW, minimum=1.0)
# Hosts that join enabled at their first heartbeat (names, or shell patterns such as `hv*`); any other
# new host joins disabled until an admin enables it. Default: the host `make run` configures
# (COMPUTE_HOST), if set.
COMPUTE_TRUSTED_HOSTS = env_list("COMPUTE_TRUSTED_HOSTS",
                                 [env_str("COMPUTE_HOST", "")] if env_str("COMPUTE_HOST", "") else [])

# --- Celery (scheduler, conductor, beat; compute workers have their own app) ----------------------
CELERY_BROKER_URL = credentials.redis_url(env_str("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
                                          REDIS_PASSWORD)
# Celery takes the environment's CELERY_BROKER_URL over this setting, and that variable holds the URL
# without REDIS_PASSWORD: the URLs Celery connects with (read: consume, write: send) are set explicitly.
CELERY_BROKER_READ_URL = CELERY_BROKER_WRITE_URL = CELERY_BROKER_URL
# Where compute workers store results of synchronous calls (console output).
CELERY_RPC_BACKEND = credentials.redis_url(env_str("CELERY_RPC_BACKEND", "redis://127.0.0.1:6379/1"),
                                           REDIS_PASSWORD)
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = env_int("CELERY_RESULT_EXPIRES", 7 * 24 * 3600, minimum=60)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# acks_late + reject_on_worker_lost: a task whose worker dies is delivered again instead of lost;
# every task is written to be safe to run twice.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message at a time per worker process, so a long task never sits on a prefetched one.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 120
CELERY_TASK_TIME_LIMIT = 180
# Redis redelivers an unacknowledged task after visibility_timeout: keep it above the longest
# hard time limit of any task (compute tasks included), or a slow task runs twice.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 7200}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A control-plane task that loses the database is retried (cloudctl.database.DatabaseTask) at most
# this many times, after 1, 2, 4, ... seconds (full jitter) up to TASK_DATABASE_RETRY_MAX_DELAY each.
# A compute host's report is signed: its last retry must run within REPORT_MAX_SKEW of the signing.
TASK_DATABASE_MAX_RETRIES = env_int("TASK_DATABASE_MAX_RETRIES", 10, minimum=0)
TASK_DATABASE_RETRY_MAX_DELAY = env_int("TASK_DATABASE_RETRY_MAX_DELAY", 30, minimum=1)
_database_retry_window = sum(min(TASK_DATABASE_RETRY_MAX_DELAY, 2 ** n)
                             for n in range(TASK_DATABASE_MAX_RETRIES))
if _database_retry_window >= REPORT_MAX_SKEW:
    raise ImproperlyConfiguredEnv(
        "TASK_DATABASE_MAX_RETRIES", str(TASK_DATABASE_MAX_RETRIES),
        f"retries that end within REPORT_MAX_SKEW ({REPORT_MAX_SKEW:g} s; these take up to "
        f"{_database_retry_window} s with TASK_DATABASE_RETRY_MAX_DELAY={TASK_DATABASE_RETRY_MAX_DELAY})")
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_TASK_ROUTES = {
    contract.CONDUCTOR_HOST_HEARTBEAT: {"queue": contract.CONDUCTOR_STATUS_QUEUE},
    contract.CONDUCTOR_POWER_STATE_UPDATE: {"queue": contract.CONDUCTOR_STATUS_QUEUE},
    "scheduler.*": {"queue": contract.SCHEDULER_QUEUE},
    "conductor.*": {"queue": contract.CONDUCTOR_QUEUE},
}
CELERY_IMPORTS = ("scheduler.tasks", "cloudctl.compute.tasks", "cloudctl.network.tasks")
CELERY_BEAT_SCHEDULE = {
    "reap-expired-tasks": {
        "task": "conductor.reap_expired_tasks",
        "schedule": env_float("REAPER_INTERVAL", 30.0, minimum=1.0),
    },
    "confirm-expired-resizes": {
        "task": "conductor.confirm_expired_resizes",
        "schedule": env_float("REAPER_INTERVAL", 30.0, minimum=1.0),
    },
    "fence-and-evacuate-hosts": {
        "task": "conductor.hosts_fence_and_evacuate",
        "schedule": HOST_FENCE_INTERVAL,
    },
    "network-resync": {
        "task": "conductor.network_resync",
        "schedule": float(NETWORK_RESYNC_INTERVAL),
    },
}
