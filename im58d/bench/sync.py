"""Sync mode: the HTTP bytes of keeping a contact list in step.

The SDK's ``Sync`` for ``bench0`` with 500 friends in 5 categories and 50
groups (built straight in the database of a daemon of the bench's own),
with and without gzip; every byte that crosses the client's socket counts.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer

from ..client.cache import Cache
from ..client.sync import Sync
from ..store.accounts import create_group_txn, make_friends_txn, uid_for_name_txn
from ..store.lists import add_category_txn
from ..store.sqlite import open_database
from .common import PASSWORD, Daemon, device_id_b64
from .httpmeter import Session, WireMeter, metered_agent

_NICK = "明华晓丽建国伟芳静强军磊洋艳勇杰娟涛超秀英霞平刚桂兰"
_WORDS = "今天天气很好我们一起去吃饭周末爬山读书摄影旅行跑步篮球交流群欢迎新朋友"


def populate_sync_world(database: str, friends: int, categories: int, groups: int,
                        group_size: int) -> None:
    """bench0 with ``friends`` friends (bench1..) spread over ``categories``
    categories and ``groups`` groups it owns of ``group_size`` friends each;
    Chinese nicks, genders and birthdays, group names and intros; the same
    every run (a fixed seed)."""
    rng = random.Random(58)
    db = open_database(database)
    db.conn.execute("BEGIN")
    me = uid_for_name_txn(db, "bench0")
    assert me is not None
    cids = [add_category_txn(db, me, f"分组{i}")[0] for i in range(categories)]
    uids = []
    for i in range(1, friends + 1):
        uid = uid_for_name_txn(db, f"bench{i}")
        assert uid is not None
        uids.append(uid)
        nick = "".join(rng.choice(_NICK) for _ in range(rng.randint(2, 3)))
        birthday = (f"{rng.randint(1960, 2005)}-{rng.randint(1, 12):02}-{rng.randint(1, 28):02}"
                    if rng.random() < 0.7 else None)
        db.execute("UPDATE users SET nick = ?, gender = ?, birthday = ? WHERE id = ?",
                   (nick, rng.randint(0, 2), birthday, uid))
        make_friends_txn(db, me, uid, 0)
        db.execute("UPDATE friends SET category = ? WHERE uid = ? AND friend = ?",
                   (cids[i % len(cids)] if cids else 0, me, uid))
    for _ in range(groups):
        name = "".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
        intro = "".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 40)))
        create_group_txn(db, name, me, rng.sample(uids, min(group_size, len(uids))), 0, intro)
    db.conn.execute("COMMIT")
    db.conn.close()


async def sync_costs(reactor: Any, http_port: int, screen: int = 20
                     ) -> dict[str, dict[str, Any]]:
    """The requests and bytes on the wire (both ways, HTTP headers included)
    of the SDK's ``Sync`` for bench0, with and without gzip: a cold sync, a
    first screen of ``screen`` friends, a warm sync with nothing changed, a
    sync after one friend on screen changed their nick (with the screen's
    refresh), everything pulled through the sync (a cold cache, then every
    detail and member list) and the naive pull of an app without versions
    (every list and every detail; then also every group's members)."""
    costs: dict[str, dict[str, Any]] = {}
    for gzip in (True, False):
        costs.update(await _sync_costs(reactor, f"http://127.0.0.1:{http_port}", gzip, screen))
    return costs


async def _sync_costs(reactor: Any, url: str, gzip: bool, screen: int
                      ) -> dict[str, dict[str, Any]]:
    costs: dict[str, dict[str, Any]] = {}
    meter = WireMeter()
    agent, pool = metered_agent(reactor, meter, gzip)
    http = HTTPClient(agent)

    async def call(method: str, path: str, token: str, body: Any = None) -> Any:
        headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}
        if body is None:
            response = await http.request(method, url + path, headers=headers)
        else:
            response = await http.request(method, url + path, headers=headers, json=body)
        content = await response.content()
        if response.code != 200:
            raise SystemExit(f"im58d-bench: {method} {path}: {response.code} {content!r}")
        return json.loads(content)

    async def login(user: str) -> dict[str, Any]:
        response = await http.post(url + "/v1/login", json={
            "user": user, "password": PASSWORD, "device_id": device_id_b64(user)})
        answer: dict[str, Any] = json.loads(await response.content())
        return answer

    async def measure(name: str, *steps: Callable[[], Any]) -> None:
        before = meter.snapshot()
        t0 = time.perf_counter()
        for step in steps:
            await defer.ensureDeferred(step())
        elapsed = time.perf_counter() - t0
        requests, up, down = (b - a for a, b in zip(before, meter.snapshot(), strict=True))
        costs[f"{name}_{'gzip' if gzip else 'plain'}"] = {
            "requests": requests, "bytes_up": up, "bytes_down": down,
            "bytes": up + down, "ms": round(elapsed * 1000, 1)}

    me = await login("bench0")
    token = me["token"]
    session = Session(http, url, token, me["uid"])
    sync = Sync(Cache(), session)
    friend_ids = [u for u, _ in (await call("GET", "/v1/friends", token))["friends"]]
    shown = friend_ids[:screen]
    await measure("cold_sync", sync.run)
    await measure("first_screen", lambda: sync.show(shown))
    await measure("warm_unchanged", sync.run)
    other = await login(f"bench{shown[0] - me['uid']}")
    await call("PATCH", "/v1/me", other["token"], {"nick": f"改名{'甲' if gzip else '乙'}"})
    await measure("one_nick_changed", sync.run, lambda: sync.show(shown))
    everything = Sync(Cache(), session)

    async def all_members() -> None:
        for gid in everything.cache.groups():
            await everything.members(gid)

    await measure("cold_everything", everything.run,
                  lambda: everything.show(friend_ids),
                  lambda: everything.show_groups(everything.cache.groups()),
                  all_members)
    lists: dict[str, Any] = {}

    async def naive_lists() -> None:
        for name in ("friends", "categories", "groups"):
            lists[name] = await call("GET", f"/v1/{name}", token)

    async def naive_details() -> None:
        have = {str(u): 0 for u, _ in lists["friends"]["friends"]}
        await call("POST", "/v1/users/sync", token, {"have": have})
        have = {str(g): 0 for g in lists["groups"]["groups"]}
        await call("POST", "/v1/groups/sync", token, {"have": have})

    async def naive_members() -> None:
        for gid in lists["groups"]["groups"]:
            await call("GET", f"/v1/groups/{gid}/members", token)

    await measure("naive_lists_details", naive_lists, naive_details)
    await measure("naive_with_members", naive_lists, naive_details, naive_members)
    await pool.closeCachedConnections()
    return costs


async def sync_mode(reactor: Any, keep: bool = False, config: str | None = None,
                    friends: int = 500, categories: int = 5, groups: int = 50,
                    group_size: int = 20) -> dict[str, dict[str, Any]]:
    """``sync_costs`` on a daemon of the bench's own with the world built
    straight in its database."""
    daemon = Daemon(friends + 1, keep, config)
    try:
        populate_sync_world(daemon.database, friends, categories, groups, group_size)
        return await sync_costs(reactor, daemon.http_port)
    finally:
        daemon.close()
