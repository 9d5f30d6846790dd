from django.apps import AppConfig


class IdentityConfig(AppConfig):
    name = "cloudctl.identity"
    label = "identity"
    verbose_name = "Projects, users and roles"

    def ready(self) -> None:
        from cloudctl.identity import signals

        signals.connect()
