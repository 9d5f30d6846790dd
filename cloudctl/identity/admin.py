"""The Django admin's projects, users' roles and tokens; its login page is throttled as the API's.

Saving goes through the same services as the API: disabling a project revokes its tokens, a new
password or a disabled user revokes the user's (the user model's save, see signals.py)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from rest_framework.exceptions import Throttled

from cloudctl.identity import services
from cloudctl.identity.models import Project, RoleAssignment, Token


class ProjectRoleInline(admin.TabularInline):
    model = RoleAssignment
    fk_name = "project"
    extra = 0
    fields = ("user", "role", "created")
    readonly_fields = ("created",)
    autocomplete_fields = ("user",)
    verbose_name = "role assignment"


class UserRoleInline(ProjectRoleInline):
    fk_name = "user"
    fields = ("project", "role", "created")
    autocomplete_fields = ("project",)


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "description", "enabled", "created")
    list_filter = ("enabled",)
    search_fields = ("name",)
    inlines = [ProjectRoleInline]

    def save_model(self, request: HttpRequest, obj: Project, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "enabled" in form.changed_data and not obj.enabled:
            services.tokens_revoke_of_project(obj)  # as PATCH /projects/{id}/ does


user_model = get_user_model()
if admin.site.is_registered(user_model):
    admin.site.unregister(user_model)


@admin.register(user_model)
class CloudUserAdmin(UserAdmin):
    """Django's user admin plus the user's roles. ``Staff status`` opens this admin site; the
    cloud administrator is the ``admin`` role, given here or in a project's page."""

    inlines = [UserRoleInline]


@admin.register(Token)
class TokenAdmin(admin.ModelAdmin):
    """API tokens: who, which project, since and until when. The secret is never stored (only its
    SHA-256), so it cannot be shown; an administrator may revoke."""

    list_display = ("id", "user", "project", "created", "expires_at", "revoked_at", "state")
    list_filter = ("revoked_at", "project")
    search_fields = ("user__username", "project__name")
    fields = ("user", "project", "created", "expires_at", "revoked_at")
    readonly_fields = fields
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tokens are issued by POST /api/v1/auth/token/, to their user only

    @admin.display(description="state")
    def state(self, token: Token) -> str:
        if token.revoked_at is not None:
            return "revoked"
        return "expired" if token.expires_at <= timezone.now() else "valid"

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[Token]) -> None:
        for token in queryset:
            services.token_revoke(token_id=token.pk)
        self.message_user(request, f"{queryset.count()} token(s) revoked", messages.SUCCESS)


def throttled_admin_login(request: HttpRequest, extra_context: dict[str, Any] | None = None
                          ) -> HttpResponse:
    """/admin/login/: the admin site's login, counted and throttled as the token endpoint's (the
    same LoginAttempt rows: a username locked out of one is locked out of both)."""
    username = request.POST.get("username", "") if request.method == "POST" else ""
    if not username:
        return admin.site.login(request, extra_context)
    try:
        services.login_attempt_begin(username)
    except Throttled as exc:
        wait = int(exc.wait or 1)
        return HttpResponse(f"{exc.detail}\n", status=429, content_type="text/plain",
                            headers={"Retry-After": str(wait)})
    response = admin.site.login(request, extra_context)
    # The admin answers a good password with a redirect and a wrong one with the form again.
    if response.status_code == 302 and request.user.is_authenticated:
        services.login_attempt_succeeded(username)
    return response
