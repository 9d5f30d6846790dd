from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "cloudctl.quotas"
    label = "quotas"
    verbose_name = "Quotas"
