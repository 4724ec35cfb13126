"""The HTTP short-connection API (PROTOCOL.md section 2): the resource tree."""

from __future__ import annotations

from twisted.web.server import Request, Site

from ..routing.iplist import IPList
from .resource import Directory, JSONResource, not_modified, respond


class IPListResource(JSONResource):
    """``GET /v1/iplist``: the access servers, by address, with weights."""

    def __init__(self, iplist: IPList) -> None:
        super().__init__()
        self.iplist = iplist

    def render_GET(self, request: Request) -> bytes:
        if not_modified(request, self.iplist.version):
            return b""
        return respond(request, self.iplist.as_json())


def make_root(iplist: IPList) -> Directory:
    root = Directory()
    v1 = Directory()
    root.putChild(b"v1", v1)
    v1.putChild(b"iplist", IPListResource(iplist))
    return root


def make_site(iplist: IPList) -> Site:
    site = Site(make_root(iplist))
    site.displayTracebacks = False
    return site
