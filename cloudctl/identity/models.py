"""Projects (tenants), the roles users hold in them, API tokens and failed logins."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Role(models.TextChoices):
    """Keystone's default roles, each implying the ones below it: admin > member > reader.

    ``admin`` is the cloud administrator's role (Keystone's legacy admin): a request scoped to a
    project in which its user holds ``admin`` sees and manages every project's resources."""

    READER = "reader"  # lists and shows
    MEMBER = "member"  # lists, shows, creates and acts in its project
    ADMIN = "admin"  # everything, in every project


ROLE_IMPLIES: dict[str, list[str]] = {
    Role.ADMIN: [Role.ADMIN, Role.MEMBER, Role.READER],
    Role.MEMBER: [Role.MEMBER, Role.READER],
    Role.READER: [Role.READER],
}


class Project(models.Model):
    name = models.CharField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(
        default=True, help_text="a disabled project's tokens stop working and no new ones are issued")
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class RoleAssignment(models.Model):
    """A user's role in a project. A user's first assignment (lowest id) is its default project."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                             related_name="role_assignments")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="role_assignments")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("id",)
        constraints = [models.UniqueConstraint(fields=("user", "project"),
                                               name="identity_one_role_per_user_and_project")]

    def __str__(self) -> str:
        return f"{self.user} is {self.role} in {self.project}"


class Token(models.Model):
    """An API token scoped to one project. Only the SHA-256 of the secret is stored: the secret is
    shown once, in the answer that issues it."""

    digest = models.CharField(max_length=64, unique=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                             related_name="api_tokens")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="tokens")
    created = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=("user", "revoked_at"), name="identity_token_user_live")]

    def __str__(self) -> str:
        return f"token {self.pk} of {self.user} in {self.project}"


class LoginAttempt(models.Model):
    """A password check for a username that has not succeeded (yet): the rows of the last
    LOGIN_FAILURE_WINDOW seconds throttle further attempts. In the database so that every web worker
    counts the same ones."""

    username = models.CharField(max_length=150, db_index=True)
    at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.username} at {self.at:%Y-%m-%d %H:%M:%S}"
