from django.apps import AppConfig


class NetworkConfig(AppConfig):
    name = "cloudctl.network"
    label = "network"
    verbose_name = "Networks"
