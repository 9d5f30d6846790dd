"""POST /api/v1/auth/token/ : username + password -> token."""

from __future__ import annotations

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.authtoken.models import Token
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from cloudctl.api import ErrorSerializer, error_responses


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(trim_whitespace=False)


class TokenResponseSerializer(serializers.Serializer):
    """Documentation only: the answer of POST /api/v1/auth/token/."""

    token = serializers.CharField(help_text="send as `Authorization: Token <token>`")
    user = serializers.CharField()
    is_admin = serializers.BooleanField()


class TokenView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        summary="Exchange a username and password for an API token", request=TokenRequestSerializer,
        responses={200: TokenResponseSerializer, **error_responses(400),
                   401: OpenApiResponse(ErrorSerializer, description="Invalid username or password")})
    def post(self, request: Request) -> Response:
        body = TokenRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user = authenticate(request, username=body.validated_data["username"],
                            password=body.validated_data["password"])
        if user is None:
            return Response({"detail": "invalid username or password"},
                            status=status.HTTP_401_UNAUTHORIZED,
                            headers={"WWW-Authenticate": "Token"})
        token, _ = Token.objects.get_or_create(user=user)
        return Response({"token": token.key, "user": user.get_username(),
                         "is_admin": user.is_staff})
