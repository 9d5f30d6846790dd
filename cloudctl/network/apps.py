from django.apps import AppConfig


class NetworkConfig(AppConfig):
    name = "cloudctl.network"
    label = "network"
    verbose_name = "Networks"

    def ready(self) -> None:
        from cloudctl.network import quota_usage

        quota_usage.register()
