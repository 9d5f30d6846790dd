"""/api/v1/quotas/<project>/ (show: administrators any project, others their own; change:
administrators) and /api/v1/limits/ (the caller's project, with Nova's ``absolute`` keys)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from cloudctl.api import ProjectRefSerializer, error_responses
from cloudctl.identity.models import Project
from cloudctl.identity.services import is_admin, project_id_of, project_of
from cloudctl.quotas.resources import RESOURCES
from cloudctl.quotas.services import nova_limits, quota_update, quota_usage


class QuotaEntrySerializer(serializers.Serializer):
    """Documentation only: one resource's limit and what is in use."""

    limit = serializers.IntegerField(help_text="-1: unlimited")
    in_use = serializers.IntegerField(help_text="counted from the resources now; per-owner "
                                                "resources: the largest owner")


QuotaSetSerializer = type("QuotaSetSerializer", (serializers.Serializer,), {
    "__doc__": "Documentation only: every resource's limit and usage.",
    **{r.name: QuotaEntrySerializer(help_text=f"{r.description} (per {r.per.replace('_', ' ')})")
       for r in RESOURCES},
})

QuotaUpdateSerializer = type("QuotaUpdateSerializer", (serializers.Serializer,), {
    "__doc__": "Documentation only: new limits (-1: unlimited) of some resources.",
    **{r.name: serializers.IntegerField(min_value=-1, required=False, help_text=r.description)
       for r in RESOURCES},
})


class ProjectQuotasSerializer(serializers.Serializer):
    """Documentation only: a project's quotas."""

    project = ProjectRefSerializer()
    quotas = QuotaSetSerializer()


class LimitsSerializer(ProjectQuotasSerializer):
    """Documentation only: the caller's project's quotas, and Nova's ``absolute`` limits."""

    absolute = serializers.DictField(child=serializers.IntegerField(), help_text=(
        "Nova's names: maxTotalInstances, totalInstancesUsed, maxTotalCores, totalCoresUsed, "
        "maxTotalRAMSize, totalRAMUsed, maxServerGroups, totalServerGroupsUsed, "
        "maxServerGroupMembers, maxTotalKeypairs"))


PROJECT = OpenApiParameter("project", OpenApiTypes.STR, OpenApiParameter.PATH,
                           description="the project's id or name")


def _answer(project: Project) -> dict[str, Any]:
    return {"project": {"id": project.pk, "name": project.name}, "quotas": quota_usage(project)}


class QuotaView(APIView):
    def _project(self, request: Request, ref: str) -> Project:
        """The project named by id or name; another project than the caller's is 404 for a
        non-administrator, as if it did not exist."""
        found = (Project.objects.filter(pk=int(ref)).first() if ref.isdigit() else None) \
            or Project.objects.filter(name=ref).first()
        if found is None or (not is_admin(request.user) and found.pk != project_id_of(request.user)):
            raise NotFound(f"no project {ref!r}")
        return found

    @extend_schema(summary="A project's quotas: each resource's limit and usage (administrators: any "
                           "project; others: their own)",
                   parameters=[PROJECT],
                   responses={200: ProjectQuotasSerializer, **error_responses(401, 403, 404)})
    def get(self, request: Request, project: str) -> Response:
        return Response(_answer(self._project(request, project)))

    @extend_schema(summary="Change some of a project's limits (administrators)",
                   parameters=[PROJECT], request=QuotaUpdateSerializer,
                   responses={200: ProjectQuotasSerializer, **error_responses(400, 401, 403, 404)})
    def patch(self, request: Request, project: str) -> Response:
        if not is_admin(request.user):
            raise PermissionDenied("only administrators may change quotas")
        found = self._project(request, project)
        quota_update(project=found, limits=request.data)
        return Response(_answer(found))


class LimitsView(APIView):
    @extend_schema(summary="Your project's quotas, with Nova's absolute limits",
                   responses={200: OpenApiResponse(LimitsSerializer), **error_responses(401, 403)})
    def get(self, request: Request) -> Response:
        project = project_of(request.user)
        answer = _answer(project)
        return Response({**answer, "absolute": nova_limits(answer["quotas"])})
