"""The HTTP short-connection API (PROTOCOL.md section 2): the resource tree."""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request, Site

from ..logging import access_log_formatter
from ..logic.interfaces import ISessions
from ..routing.iplist import IPList
from ..store.interfaces import IStore
from . import admin
from .inbox import InboxResource, StatusResource
from .lists import (
    CategoriesResource,
    FriendsResource,
    GroupsResource,
    MeResource,
    UsersResource,
    VersionsResource,
)
from .report import ReportResource, StatsResource
from .resource import BoundedRequest, Directory, JSONResource, not_modified, respond
from .session import DevicesResource, LoginResource


class IPListResource(JSONResource):
    """``GET /v1/iplist``: the access servers, by address, with weights."""

    def __init__(self, iplist: IPList) -> None:
        super().__init__()
        self.iplist = iplist

    def render_GET(self, request: Request) -> bytes:
        if not_modified(request, self.iplist.version):
            return b""
        return respond(request, self.iplist.as_json())


def make_root(iplist: IPList, sessions: ISessions, store: IStore, clock: Any,
              max_members: int = 500, admin_token: str = "", metrics: Any = None) -> Directory:
    root = Directory()
    v1 = Directory()
    root.putChild(b"v1", v1)
    v1.putChild(b"iplist", IPListResource(iplist))
    v1.putChild(b"login", LoginResource(sessions, iplist))
    v1.putChild(b"devices", DevicesResource(sessions))
    v1.putChild(b"inbox", InboxResource(sessions, store))
    v1.putChild(b"status", StatusResource(sessions, store))
    lists = (sessions, store, clock)
    v1.putChild(b"versions", VersionsResource(*lists))
    v1.putChild(b"friends", FriendsResource(*lists))
    v1.putChild(b"categories", CategoriesResource(*lists))
    v1.putChild(b"groups", GroupsResource(*lists, max_members))
    v1.putChild(b"users", UsersResource(*lists))
    v1.putChild(b"me", MeResource(*lists))
    v1.putChild(b"report", ReportResource(sessions, store, clock))
    v1.putChild(b"stats", StatsResource(admin_token, store, clock))
    if metrics is not None:  # /metrics and the admin page
        admin.mount(root, metrics, store, clock, admin_token)
    return root


def make_site(iplist: IPList, sessions: ISessions, store: IStore, clock: Any,
              max_members: int = 500, admin_token: str = "", metrics: Any = None) -> Site:
    root = make_root(iplist, sessions, store, clock, max_members, admin_token, metrics)
    # the access log line: no fragment, no query secret (im58d.logging)
    site = Site(root, requestFactory=BoundedRequest, logFormatter=access_log_formatter)
    site.displayTracebacks = False
    return site
