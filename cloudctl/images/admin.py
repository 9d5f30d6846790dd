from django.contrib import admin

from cloudctl.images.models import Image


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ("name", "id", "status", "disk_format", "size", "visibility", "owner", "created")
    list_filter = ("status", "disk_format", "visibility")
    search_fields = ("name", "id")
    readonly_fields = ("status", "size", "virtual_size", "sha256")
