from typing import Any

from django import forms
from django.contrib import admin

from cloudctl.quotas.models import ProjectQuota
from cloudctl.quotas.resources import RESOURCES
from cloudctl.quotas.services import quota_update


class ProjectQuotaForm(forms.ModelForm):
    resource = forms.ChoiceField(choices=[(r.name, f"{r.name}: {r.description}") for r in RESOURCES])
    limit = forms.IntegerField(min_value=-1, help_text="-1: unlimited")

    class Meta:
        model = ProjectQuota
        fields = ("project", "resource", "limit")


@admin.register(ProjectQuota)
class ProjectQuotaAdmin(admin.ModelAdmin):
    """Per-project overrides of the default limits (the settings' QUOTA_*); -1 is unlimited."""

    form = ProjectQuotaForm
    list_display = ("project", "resource", "limit")
    list_filter = ("resource",)
    search_fields = ("project__name",)

    def get_readonly_fields(self, request: Any, obj: ProjectQuota | None = None) -> tuple[str, ...]:
        return ("project", "resource") if obj is not None else ()

    def save_model(self, request: Any, obj: ProjectQuota, form: Any, change: bool) -> None:
        # The API's path: the project's row locked, the limit validated.
        quota_update(project=obj.project, limits={obj.resource: obj.limit})
        obj.pk = ProjectQuota.objects.get(project=obj.project, resource=obj.resource).pk
