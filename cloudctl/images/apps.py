from django.apps import AppConfig


class ImagesConfig(AppConfig):
    name = "cloudctl.images"
    label = "images"
    verbose_name = "Images"
