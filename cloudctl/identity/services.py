"""Who may see what, and the operations on projects, users, roles and tokens, in one place.

A request acts in ONE project: its *scope*. A token carries it (the project named when the token was
issued); a session (the Django admin, the browsable pages) takes the user's first project by
assignment order. :func:`is_admin`, :func:`project_of` and :func:`project_id_of` answer for the
scope, so a user who is ``admin`` in one project and ``member`` in another is a cloud administrator
only with a token of the first.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from rest_framework import serializers
from rest_framework.exceptions import AuthenticationFailed, PermissionDenied, Throttled

from cloudctl.identity.models import (
    ROLE_IMPLIES,
    LoginAttempt,
    Project,
    Role,
    RoleAssignment,
    Token,
)

SCOPE_ATTRIBUTE = "cloudctl_scope"


@dataclass(frozen=True)
class Scope:
    """The project a request acts in and the role its user holds there."""

    project_id: int
    project_name: str
    role: str
    token_id: int | None = None  # None: a session's default scope

    @property
    def roles(self) -> list[str]:
        """The role and the roles it implies (admin > member > reader), as Keystone lists them."""
        return list(ROLE_IMPLIES[self.role])


# --- the request's scope ---------------------------------------------------------------------------

def scope_attach(user: Any, scope: Scope | None) -> None:
    setattr(user, SCOPE_ATTRIBUTE, scope)


def default_scope(user: Any) -> Scope | None:
    """The user's first role assignment in an enabled project (by assignment order), or None."""
    first = (RoleAssignment.objects.filter(user=user, project__enabled=True)
             .select_related("project").order_by("id").first())
    if first is None:
        return None
    return Scope(project_id=first.project_id, project_name=first.project.name, role=first.role)


def scope_of(user: Any) -> Scope | None:
    """The scope the authentication attached to ``user``; for a user without one (a session, or a
    user loaded by a command), the default scope, computed once per user object. None for the
    anonymous user and the compute workers' service principal."""
    if user is None or getattr(user, "is_service", False) or not getattr(user, "is_authenticated", False):
        return None
    if not hasattr(user, SCOPE_ATTRIBUTE):
        scope_attach(user, default_scope(user))
    scope: Scope | None = getattr(user, SCOPE_ATTRIBUTE)
    return scope


def is_admin(user: Any) -> bool:
    """A cloud administrator: the request's scope holds the ``admin`` role (not Django's is_staff)."""
    scope = scope_of(user)
    return scope is not None and scope.role == Role.ADMIN


def is_reader(user: Any) -> bool:
    """The request's scope holds only the ``reader`` role: it may list and show, not act."""
    scope = scope_of(user)
    return scope is not None and scope.role == Role.READER


def project_of(user: Any) -> Project:
    """The project the request acts in; a user without one may not create resources."""
    scope = scope_of(user)
    if scope is None:
        raise PermissionDenied("your user has no role in any enabled project; ask an administrator")
    return Project.objects.get(pk=scope.project_id)


def project_id_of(user: Any) -> int | None:
    scope = scope_of(user)
    return None if scope is None else scope.project_id


# --- roles -----------------------------------------------------------------------------------------

def role_assign(*, user: AbstractBaseUser, project: Project, role: str = Role.MEMBER) -> RoleAssignment:
    """Give ``user`` ``role`` in ``project`` (replacing the role it had there)."""
    if role not in Role.values:
        raise serializers.ValidationError({"role": [f"must be one of {', '.join(Role.values)}"]})
    assignment, _ = RoleAssignment.objects.update_or_create(user=user, project=project,
                                                            defaults={"role": role})
    return assignment


def role_remove(*, user: AbstractBaseUser, project: Project) -> None:
    """Take ``user``'s role in ``project`` away; its tokens of that project stop working."""
    with transaction.atomic():
        deleted, _ = RoleAssignment.objects.filter(user=user, project=project).delete()
        if not deleted:
            raise serializers.ValidationError(
                {"user": [f"{user.get_username()} has no role in project {project.name}"]})
        _revoke(Token.objects.filter(user=user, project=project))


def role_assignments_of(project: Project) -> QuerySet[RoleAssignment]:
    return RoleAssignment.objects.filter(project=project).select_related("user").order_by("id")


def projects_visible(user: Any) -> QuerySet[Project]:
    """Every project for an administrator; the projects the user holds a role in otherwise."""
    projects = Project.objects.order_by("id")
    return projects if is_admin(user) else projects.filter(role_assignments__user=user).distinct()


# --- projects --------------------------------------------------------------------------------------

def project_create(*, name: str, description: str = "", enabled: bool = True) -> Project:
    return Project.objects.create(name=name, description=description, enabled=enabled)


def project_update(*, project: Project, actor: Any, **fields: Any) -> Project:
    """Change name, description or enabled; disabling a project revokes its tokens (new ones are
    refused while it is disabled). A request may not disable the project it is scoped to: that
    would lock its own administrator out."""
    disabling = fields.get("enabled") is False and project.enabled
    if disabling and project_id_of(actor) == project.pk:
        raise serializers.ValidationError(
            {"enabled": ["you may not disable the project your token is scoped to"]})
    with transaction.atomic():
        for key, value in fields.items():
            setattr(project, key, value)
        project.save()
        if disabling:
            tokens_revoke_of_project(project)
    return project


# --- users -----------------------------------------------------------------------------------------

def _password_checked(password: str, user: AbstractBaseUser) -> None:
    """The password validators (AUTH_PASSWORD_VALIDATORS): 400 naming ``password`` and each reason."""
    try:
        validate_password(password, user=user)
    except DjangoValidationError as exc:
        raise serializers.ValidationError({"password": list(exc.messages)}) from None


def user_create(*, username: str, password: str, email: str = "") -> Any:
    user_model = get_user_model()
    user = user_model(username=username, email=email)
    _password_checked(password, user)
    user.set_password(password)
    user.save()
    return user


def user_update(*, user: Any, actor: Any, password: str | None = None,
                is_active: bool | None = None, email: str | None = None) -> Any:
    """A new password or a disabled user revokes the user's tokens (the user model's save does, see
    :mod:`cloudctl.identity.signals`, so the Django admin and ``changepassword`` do too)."""
    if is_active is False and getattr(actor, "pk", None) == user.pk:
        raise serializers.ValidationError({"is_active": ["you may not disable your own user"]})
    if password is not None:
        _password_checked(password, user)
        user.set_password(password)
    if is_active is not None:
        user.is_active = is_active
    if email is not None:
        user.email = email
    user.save()
    return user


def user_roles(user: AbstractBaseUser) -> list[dict[str, Any]]:
    return [{"project": {"id": a.project_id, "name": a.project.name}, "role": a.role}
            for a in RoleAssignment.objects.filter(user=user).select_related("project").order_by("id")]


# --- tokens ----------------------------------------------------------------------------------------

def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    """A new token: ``secret`` is shown to its user once and stored nowhere."""

    secret: str
    token: Token
    scope: Scope


def token_issue(*, user: Any, project: Project | None = None) -> IssuedToken:
    """A token of ``user`` scoped to ``project`` (default: the user's first enabled project), valid
    TOKEN_TTL seconds. 403 when the user holds no role there or the project is disabled."""
    if project is None:
        scope = default_scope(user)
        if scope is None:
            raise PermissionDenied(f"user {user.get_username()} has no role in any enabled project; "
                                   "ask an administrator")
        project = Project.objects.get(pk=scope.project_id)
    assignment = RoleAssignment.objects.filter(user=user, project=project).first()
    if assignment is None:
        raise PermissionDenied(f"user {user.get_username()} has no role in project {project.name}")
    if not project.enabled:
        raise PermissionDenied(f"project {project.name} is disabled")
    now = timezone.now()
    # The user's tokens that ended long ago go, so that the table does not grow forever.
    Token.objects.filter(user=user, expires_at__lt=now - timedelta(days=1)).delete()
    secret = secrets.token_urlsafe(32)
    token = Token.objects.create(digest=_digest(secret), user=user, project=project,
                                 expires_at=now + timedelta(seconds=settings.TOKEN_TTL))
    return IssuedToken(secret=secret, token=token,
                       scope=Scope(project_id=project.pk, project_name=project.name,
                                   role=assignment.role, token_id=token.pk))


def token_authenticate(secret: str) -> tuple[Any, Scope]:
    """The user and scope of a token secret; 401 with the reason when it cannot be used."""
    role = RoleAssignment.objects.filter(user=OuterRef("user"), project=OuterRef("project"))
    token = (Token.objects.select_related("user", "project")
             .annotate(role=Subquery(role.values("role")[:1]))
             .filter(digest=_digest(secret)).first())
    if token is None:
        raise AuthenticationFailed("invalid token")
    if token.revoked_at is not None:
        raise AuthenticationFailed("token revoked")
    if token.expires_at <= timezone.now():
        raise AuthenticationFailed("token expired")
    if not token.user.is_active:
        raise AuthenticationFailed("user disabled")
    if not token.project.enabled:
        raise AuthenticationFailed(f"project {token.project.name} is disabled")
    role_now: str | None = token.role  # type: ignore[attr-defined]
    if role_now is None:
        raise AuthenticationFailed(f"user no longer has a role in project {token.project.name}")
    return token.user, Scope(project_id=token.project_id, project_name=token.project.name,
                             role=role_now, token_id=token.pk)


def _revoke(tokens: QuerySet[Token]) -> int:
    return tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())


def token_revoke(*, token_id: int) -> None:
    """Revoke one token (DELETE /auth/token/, the admin's action); revoking twice is harmless."""
    _revoke(Token.objects.filter(pk=token_id))


def tokens_revoke_of_user(user: AbstractBaseUser) -> int:
    """Revoke every live token of ``user`` (password changed, user disabled)."""
    return _revoke(Token.objects.filter(user=user))


def tokens_revoke_of_project(project: Project) -> int:
    """Revoke every live token scoped to ``project`` (the project is disabled): enabling it again
    does not bring them back."""
    return _revoke(Token.objects.filter(project=project))


# --- logging in ------------------------------------------------------------------------------------

class LoginThrottled(Throttled):
    """429: too many failed logins for one username in LOGIN_FAILURE_WINDOW seconds (DRF sends the
    wait as Retry-After)."""

    def __init__(self, username: str, wait: int) -> None:
        # DRF adds "Expected available in <wait> seconds."
        super().__init__(wait=wait, detail=f"too many failed logins for user {username!r}.")


def login_attempt_begin(username: str) -> None:
    """Count an attempt for ``username`` before its password is checked, or refuse it (429).

    The attempt is stored first and counted against the earlier ones: two web workers checking at the
    same time both see each other, and a burst cannot slip past the limit. A refused attempt is not
    kept (a client that keeps trying does not extend its wait)."""
    now = timezone.now()
    window = timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)
    limit = settings.LOGIN_FAILURE_LIMIT
    # Rows out of the window count for nobody: every username's go (guesses at usernames that do not
    # exist must not fill the table).
    LoginAttempt.objects.filter(at__lt=now - window).delete()
    attempt = LoginAttempt.objects.create(username=username, at=now)
    earlier: list[datetime] = list(
        LoginAttempt.objects.filter(username=username, at__gte=now - window, pk__lt=attempt.pk)
        .order_by("-at").values_list("at", flat=True)[:limit])
    if len(earlier) >= limit:
        attempt.delete()
        # Free again when the limit-th most recent failure leaves the window.
        wait = max(1, math.ceil((earlier[limit - 1] + window - now).total_seconds()))
        raise LoginThrottled(username, wait)


def login_attempt_succeeded(username: str) -> None:
    """The password was right: this username's failures are forgotten (no one else's)."""
    LoginAttempt.objects.filter(username=username).delete()


def project_by_ref(ref: str) -> Project | None:
    """A project by id or by name."""
    if ref.isdigit():
        found = Project.objects.filter(pk=int(ref)).first()
        if found is not None:
            return found
    return Project.objects.filter(name=ref).first()


def password_login(*, request: HttpRequest | None, username: str, password: str,
                   project: str | None = None) -> IssuedToken:
    """Username + password (+ a project by id or name) -> a token scoped to that project.

    429 after LOGIN_FAILURE_LIMIT failures for the username, 401 for a wrong password (or a disabled
    user), 403 for a project the user holds no role in or a disabled one."""
    login_attempt_begin(username)
    user = authenticate(request, username=username, password=password)
    if user is None:
        raise AuthenticationFailed("invalid username or password")
    login_attempt_succeeded(username)
    chosen = None
    if project is not None:
        chosen = project_by_ref(project)
        if chosen is None:
            raise PermissionDenied(f"user {username} has no role in project {project}")
    return token_issue(user=user, project=chosen)
