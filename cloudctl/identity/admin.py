from django.contrib import admin

from cloudctl.identity.models import Membership, Project


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "description", "created")
    search_fields = ("name",)
    inlines = [MembershipInline]
