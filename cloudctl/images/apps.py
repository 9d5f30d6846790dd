from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "cloudctl.images"
    label = "images"
    verbose_name = "Images"

    def ready(self) -> None:
        from cloudctl.images import quota_usage

        quota_usage.register()
