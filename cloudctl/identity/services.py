"""Who may see what: the project scoping rules, in one place."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from rest_framework.exceptions import PermissionDenied

from cloudctl.identity.models import Membership, Project


def is_admin(user: Any) -> bool:
    return bool(getattr(user, "is_staff", False))


def project_of(user: AbstractBaseUser) -> Project:
    """The project a user acts in; a user without one may not create resources."""
    try:
        return Membership.objects.select_related("project").get(user=user).project
    except Membership.DoesNotExist:
        raise PermissionDenied("your user belongs to no project; ask an administrator") from None


def project_id_of(user: Any) -> int | None:
    return Membership.objects.filter(user=user).values_list("project_id", flat=True).first()


def membership_set(*, user: AbstractBaseUser, project: Project) -> Membership:
    membership, _ = Membership.objects.update_or_create(user=user, defaults={"project": project})
    return membership
