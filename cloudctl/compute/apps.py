from django.apps import AppConfig


class ComputeConfig(AppConfig):
    name = "cloudctl.compute"
    label = "compute"
    verbose_name = "Compute"
