"""Images in the admin; an upload goes through the same service (and inspection) as the API."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest

from cloudctl.images.models import Image
from cloudctl.images.services import ImageConflict, ImageRejected, image_delete, image_upload


class ImageForm(forms.ModelForm):
    upload = forms.FileField(required=False, help_text="the image bytes (qcow2 or raw); "
                                                       "inspected before the image is active")

    class Meta:
        model = Image
        fields = ("name", "disk_format", "container_format", "visibility", "owner", "min_ram",
                  "min_disk", "properties")


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    form = ImageForm
    list_display = ("name", "id", "status", "disk_format", "size", "visibility", "owner", "created")
    list_filter = ("status", "disk_format", "visibility")
    search_fields = ("name", "id")
    readonly_fields = ("status", "size", "virtual_size", "sha256")

    def save_model(self, request: HttpRequest, obj: Image, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        upload = form.cleaned_data.get("upload")
        if upload is None:
            return
        try:
            image_upload(image=obj, stream=upload, expected_size=upload.size)
        except (ImageRejected, ImageConflict) as refused:
            self.message_user(request, f"upload of {obj.name} refused: {refused}",
                              level=messages.ERROR)
        else:
            self.message_user(request, f"{obj.name} uploaded and active ({obj.size} bytes)")

    def delete_model(self, request: HttpRequest, obj: Image) -> None:
        image_delete(image=obj)

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        for image in queryset:
            image_delete(image=image)
