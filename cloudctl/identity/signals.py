"""A user's tokens are revoked when its password changes or it is disabled, whichever way that
happens (the users API, the Django admin, ``manage.py changepassword``): the user model's save is
the one place they all pass through, so the rule is a signal on it."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models.signals import post_save, pre_save

from cloudctl.identity.services import tokens_revoke_of_user

_PENDING = "_cloudctl_revoke_tokens"


def _note_credential_change(sender: Any, instance: Any, raw: bool = False, **_: Any) -> None:
    if raw or instance.pk is None:
        return
    before = sender.objects.filter(pk=instance.pk).values("password", "is_active").first()
    if before is None:
        return
    changed = before["password"] != instance.password or (before["is_active"] and not instance.is_active)
    setattr(instance, _PENDING, changed)


def _revoke_after_save(sender: Any, instance: Any, created: bool = False, raw: bool = False,
                       **_: Any) -> None:
    if not raw and getattr(instance, _PENDING, False):
        tokens_revoke_of_user(instance)
        setattr(instance, _PENDING, False)


def connect() -> None:
    user_model = get_user_model()
    pre_save.connect(_note_credential_change, sender=user_model,
                     dispatch_uid="cloudctl.identity.note_credential_change")
    post_save.connect(_revoke_after_save, sender=user_model,
                      dispatch_uid="cloudctl.identity.revoke_after_save")
