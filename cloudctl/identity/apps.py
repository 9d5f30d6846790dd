from django.apps import AppConfig


class IdentityConfig(AppConfig):
    name = "cloudctl.identity"
    label = "identity"
    verbose_name = "Projects and users"
