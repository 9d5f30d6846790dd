"""/api/v1/auth/token/ (issue, revoke), /api/v1/projects/ (with their members) and /api/v1/users/.

Thin views: every operation is one call of :mod:`cloudctl.identity.services`."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny, BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from cloudctl.api import (
    ErrorSerializer,
    IdOrNameField,
    ProjectRefSerializer,
    StrictCharField,
    StrictSerializer,
    error_responses,
    paginated,
)
from cloudctl.identity import services
from cloudctl.identity.models import Project, Role, RoleAssignment
from cloudctl.identity.permissions import IsAuthenticatedUser, IsCloudAdmin

# --- tokens ----------------------------------------------------------------------------------------


class TokenRequestSerializer(serializers.Serializer):
    username = StrictCharField(max_length=150)
    password = StrictCharField(trim_whitespace=False, max_length=4096)
    project = IdOrNameField(required=False, help_text="the project to act in (id or name); default: "
                                                      "the user's first project")


class TokenResponseSerializer(serializers.Serializer):
    """Documentation only: the answer of POST /api/v1/auth/token/."""

    token = serializers.CharField(help_text="send as `Authorization: Token <token>`; shown only here")
    expires_at = serializers.DateTimeField()
    project = ProjectRefSerializer(help_text="the project every request with this token acts in")
    roles = serializers.ListField(child=serializers.ChoiceField(choices=Role.choices),
                                  help_text="the role in the project and those it implies")
    user = serializers.CharField()
    is_admin = serializers.BooleanField(help_text="the admin role: a cloud administrator")


class ThrottledSerializer(ErrorSerializer):
    """429: too many failed logins; the Retry-After header says when to try again."""


class TokenView(APIView):
    """POST issues a token (no authentication); DELETE revokes the token it is sent with."""

    permission_classes = [AllowAny]

    def perform_authentication(self, request: Request) -> None:
        if request.method != "POST":  # a stale header must not stop a login
            super().perform_authentication(request)

    def get_permissions(self) -> list[BasePermission]:
        return [AllowAny()] if self.request.method == "POST" else [IsAuthenticatedUser()]

    @extend_schema(
        summary="Exchange a username and password for a token scoped to one project",
        request=TokenRequestSerializer, auth=[],
        responses={200: TokenResponseSerializer, **error_responses(400),
                   401: OpenApiResponse(ErrorSerializer, description="Invalid username or password"),
                   403: OpenApiResponse(ErrorSerializer,
                                        description="No role in that project, or it is disabled"),
                   429: OpenApiResponse(ThrottledSerializer,
                                        description="Too many failed logins for this username")})
    def post(self, request: Request) -> Response:
        body = TokenRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        issued = services.password_login(request=request._request, **body.validated_data)
        return Response({
            "token": issued.secret,
            "expires_at": issued.token.expires_at,
            "project": {"id": issued.scope.project_id, "name": issued.scope.project_name},
            "roles": issued.scope.roles,
            "user": issued.token.user.get_username(),
            "is_admin": issued.scope.role == Role.ADMIN,
        })

    @extend_schema(summary="Revoke the token this request is sent with", request=None,
                   responses={204: OpenApiResponse(description="Revoked"),
                              **error_responses(401, 404)})
    def delete(self, request: Request) -> Response:
        scope = services.scope_of(request.user)
        if scope is None or scope.token_id is None:
            raise NotFound("this request carries no user token to revoke")
        services.token_revoke(token_id=scope.token_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- projects --------------------------------------------------------------------------------------


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ("id", "name", "description", "enabled", "created")


def _unique_project_name(value: str, instance: Project | None = None) -> str:
    others = Project.objects.filter(name=value)
    if instance is not None:
        others = others.exclude(pk=instance.pk)
    if others.exists():
        raise serializers.ValidationError(f"a project named {value!r} already exists")
    return value


class ProjectCreateSerializer(StrictSerializer):
    name = StrictCharField(max_length=64)
    description = StrictCharField(required=False, allow_blank=True, max_length=1024, default="")
    enabled = serializers.BooleanField(required=False, default=True)

    def validate_name(self, value: str) -> str:
        return _unique_project_name(value)


class ProjectUpdateSerializer(StrictSerializer):
    name = StrictCharField(max_length=64, required=False)
    description = StrictCharField(required=False, allow_blank=True, max_length=1024)
    enabled = serializers.BooleanField(required=False,
                                       help_text="false: its tokens stop working, none are issued")

    def validate_name(self, value: str) -> str:
        return _unique_project_name(value, self.context.get("project"))


class UserRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()


class MemberSerializer(serializers.ModelSerializer):
    user = serializers.SerializerMethodField()

    class Meta:
        model = RoleAssignment
        fields = ("user", "role", "created")

    @extend_schema_field(UserRefSerializer)
    def get_user(self, assignment: RoleAssignment) -> dict[str, Any]:
        return {"id": assignment.user_id, "username": assignment.user.get_username()}


def _user_by_ref(ref: str) -> Any:
    """A user by id or username: 400 naming ``user`` when there is none."""
    users = get_user_model().objects.all()
    if ref.isdigit():
        found = users.filter(pk=int(ref)).first()
        if found is not None:
            return found
    found = users.filter(username=ref).first()
    if found is None:
        raise serializers.ValidationError(f"no user with id or username {ref!r}")
    return found


class MemberRequestSerializer(StrictSerializer):
    user = IdOrNameField(help_text="a user id or username")
    role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)

    def validate_user(self, ref: str) -> Any:
        return _user_by_ref(ref)


class ProjectAccess(BasePermission):
    """Every user lists and shows its own projects; the rest is the administrators'."""

    message = "only administrators (the admin role) may do this"

    def has_permission(self, request: Request, view: Any) -> bool:
        if getattr(view, "action", None) in ("list", "retrieve"):
            return True
        return IsCloudAdmin().has_permission(request, view)


PROJECT_ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH,
                              description="the project's id")
USER_REF = OpenApiParameter("user", OpenApiTypes.STR, OpenApiParameter.PATH,
                            description="the user's id or username")
ADMIN_ONLY = "(administrators)"


@extend_schema_view(
    list=extend_schema(summary="List projects: all of them for administrators, your own otherwise",
                       responses={200: ProjectSerializer(many=True), **error_responses(401)}),
    retrieve=extend_schema(summary="Show a project (administrators, or a user with a role in it)",
                           parameters=[PROJECT_ID],
                           responses={200: ProjectSerializer, **error_responses(401, 404)}),
    create=extend_schema(summary=f"Create a project {ADMIN_ONLY}", request=ProjectCreateSerializer,
                         responses={201: ProjectSerializer, **error_responses(400, 401, 403)}),
    partial_update=extend_schema(
        summary=f"Rename, describe, disable (enabled: false) or enable a project {ADMIN_ONLY}",
        parameters=[PROJECT_ID], request=ProjectUpdateSerializer,
        responses={200: ProjectSerializer, **error_responses(400, 401, 403, 404)}),
)
class ProjectViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ProjectSerializer
    permission_classes = [IsAuthenticatedUser, ProjectAccess]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self) -> QuerySet[Project]:
        return services.projects_visible(self.request.user)

    def create(self, request: Request) -> Response:
        body = ProjectCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        project = services.project_create(**body.validated_data)
        return Response(ProjectSerializer(project).data, status=status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        project = self.get_object()
        body = ProjectUpdateSerializer(data=request.data, context={"project": project})
        body.is_valid(raise_exception=True)
        project = services.project_update(project=project, actor=request.user, **body.validated_data)
        return Response(ProjectSerializer(project).data)

    @extend_schema(summary=f"List a project's members and their roles {ADMIN_ONLY}",
                   parameters=[PROJECT_ID], methods=["GET"],
                   responses={200: MemberSerializer(many=True), **error_responses(401, 403, 404)})
    @extend_schema(summary=f"Give a user a role in a project (replacing its role there) {ADMIN_ONLY}",
                   parameters=[PROJECT_ID], methods=["POST"], request=MemberRequestSerializer,
                   responses={201: MemberSerializer, **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["get", "post"])
    def members(self, request: Request, pk: str | None = None) -> Response:
        project = self.get_object()
        if request.method == "GET":
            return paginated(self, services.role_assignments_of(project),
                             lambda page: MemberSerializer(page, many=True).data)
        body = MemberRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        assignment = services.role_assign(project=project, **body.validated_data)
        return Response(MemberSerializer(assignment).data, status=status.HTTP_201_CREATED)

    @extend_schema(summary=f"Take a user's role in a project away (its tokens there stop working) "
                           f"{ADMIN_ONLY}", parameters=[PROJECT_ID, USER_REF], request=None,
                   responses={204: OpenApiResponse(description="Removed"),
                              **error_responses(400, 401, 403, 404)})
    @action(detail=True, methods=["delete"], url_path=r"members/(?P<user>[^/]+)")
    def remove_member(self, request: Request, pk: str | None = None, user: str = "") -> Response:
        project = self.get_object()
        try:
            member = _user_by_ref(user)
        except serializers.ValidationError:
            raise NotFound(f"no user with id or username {user!r}") from None
        services.role_remove(user=member, project=project)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- users -----------------------------------------------------------------------------------------


class RoleOfUserSerializer(serializers.Serializer):
    project = ProjectRefSerializer()
    role = serializers.ChoiceField(choices=Role.choices)


class UserSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.EmailField(allow_blank=True)
    is_active = serializers.BooleanField()
    date_joined = serializers.DateTimeField()
    roles = serializers.SerializerMethodField()

    @extend_schema_field(RoleOfUserSerializer(many=True))
    def get_roles(self, user: Any) -> list[dict[str, Any]]:
        return services.user_roles(user)


class UserCreateSerializer(StrictSerializer):
    username = StrictCharField(max_length=150, validators=[UnicodeUsernameValidator()])
    password = StrictCharField(trim_whitespace=False, max_length=4096,
                               help_text="checked by the password validators")
    email = serializers.EmailField(required=False, allow_blank=True, default="")

    def validate_username(self, value: str) -> str:
        if get_user_model().objects.filter(username=value).exists():
            raise serializers.ValidationError(f"a user named {value!r} already exists")
        return value


class UserUpdateSerializer(StrictSerializer):
    unchangeable = ("username",)

    password = StrictCharField(trim_whitespace=False, max_length=4096, required=False,
                               help_text="a new password revokes the user's tokens")
    is_active = serializers.BooleanField(required=False,
                                         help_text="false: the user cannot log in; its tokens are "
                                                   "revoked")
    email = serializers.EmailField(required=False, allow_blank=True)


USER_ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH, description="the user's id")


@extend_schema_view(
    list=extend_schema(summary=f"List the users with their roles {ADMIN_ONLY}",
                       responses={200: UserSerializer(many=True), **error_responses(401, 403)}),
    retrieve=extend_schema(summary=f"Show a user with its roles {ADMIN_ONLY}", parameters=[USER_ID],
                           responses={200: UserSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(summary=f"Create a user {ADMIN_ONLY}; give it a role with "
                                 "POST /projects/{id}/members/", request=UserCreateSerializer,
                         responses={201: UserSerializer, **error_responses(400, 401, 403)}),
    partial_update=extend_schema(
        summary=f"Change a user's password, e-mail, or disable it (is_active: false) {ADMIN_ONLY}",
        parameters=[USER_ID], request=UserUpdateSerializer,
        responses={200: UserSerializer, **error_responses(400, 401, 403, 404)}),
)
class UserViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = UserSerializer
    permission_classes = [IsCloudAdmin]
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Any]:
        return get_user_model().objects.order_by("id")

    def create(self, request: Request) -> Response:
        body = UserCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user = services.user_create(**body.validated_data)
        return Response(UserSerializer(user).data, status=status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        user = self.get_object()
        body = UserUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user = services.user_update(user=user, actor=request.user, **body.validated_data)
        return Response(UserSerializer(user).data)

