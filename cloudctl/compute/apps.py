from django.apps import AppConfig


class ComputeConfig(AppConfig):
    name = "cloudctl.compute"
    label = "compute"
    verbose_name = "Compute"

    def ready(self) -> None:
        from cloudctl.compute import quota_usage

        quota_usage.register()
