"""The configuration (PROTOCOL.md section 4) and ``twistd im58d``'s options and
``makeService``: defaults, every contract key, one-line errors naming the key."""

from __future__ import annotations

import os
import re
import sqlite3
import stat

from twisted.application.service import IService, MultiService
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from im58d import tap
from im58d.config import SCHEMA, Config, ConfigError, load_config, parse_config
from im58d.routing.iplist import AccessServer

# The block of PROTOCOL.md section 4, verbatim (keys, defaults and comments),
# but for the keys of features this daemon does not have yet: [store] backend
# and dsn (PostgreSQL) and the [push] section.
CONTRACT_INI = """\
[store]
database = im58d.sqlite
[listen]
access = tcp:5858:interface=127.0.0.1     ; several listeners: one per line
http = tcp:8058:interface=127.0.0.1
[session]
linger = 300                              ; seconds a session outlives its connection
heartbeat = 240                           ; seconds, told to clients in WELCOME
max_devices = 5                           ; sessions per user, one per device
expire_days = 90                          ; a session unused this long ends
[messages]
max_body = 4096                           ; bytes
friends_only = no
[admin]
token =                                   ; bearer token for /v1/stats, /metrics, the admin page
[routing]
backend = local                           ; local | redis
redis = tcp:127.0.0.1:6379                ; endpoint of the Redis server when backend = redis
"""


def contract_values(config: Config) -> dict[str, object]:
    """The values of the contract keys, by ``[section] key``."""
    return {
        "[store] database": config.database,
        "[listen] access": config.access,
        "[listen] http": config.http,
        "[session] linger": config.linger,
        "[session] heartbeat": config.heartbeat,
        "[session] max_devices": config.max_devices,
        "[session] expire_days": config.expire_days,
        "[messages] max_body": config.max_body,
        "[messages] friends_only": config.friends_only,
        "[admin] token": config.admin_token,
        "[routing] backend": config.routing_backend,
        "[routing] redis": config.redis,
    }


CONTRACT_DEFAULTS: dict[str, object] = {
    "[store] database": "im58d.sqlite",
    "[listen] access": ("tcp:5858:interface=127.0.0.1",),
    "[listen] http": ("tcp:8058:interface=127.0.0.1",),
    "[session] linger": 300,
    "[session] heartbeat": 240,
    "[session] max_devices": 5,
    "[session] expire_days": 90,
    "[messages] max_body": 4096,
    "[messages] friends_only": False,
    "[admin] token": "",
    "[routing] backend": "local",
    "[routing] redis": "tcp:127.0.0.1:6379",
}


class ConfigFileTestCase(SynchronousTestCase):
    """Writes config files into the test's temporary directory."""

    def write_config(self, text: str) -> str:
        path = str(self.mktemp()) + ".ini"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class DefaultsTests(SynchronousTestCase):
    def test_embedded_defaults_are_the_contract_defaults(self) -> None:
        """``Config()`` (what the daemon uses without a file) has exactly the
        defaults PROTOCOL.md section 4 lists."""
        self.assertEqual(contract_values(Config()), CONTRACT_DEFAULTS)

    def test_contract_block_parses_to_the_defaults(self) -> None:
        """The contract's own INI block, comments included, is accepted and
        gives the same values as the embedded defaults."""
        config = parse_config(CONTRACT_INI, "contract.ini")
        self.assertEqual(contract_values(config), CONTRACT_DEFAULTS)
        self.assertEqual(config.replace(source=Config().source), Config())

    def test_empty_text_gives_defaults(self) -> None:
        """An empty file changes nothing and records where it came from."""
        config = parse_config("", "empty.ini")
        self.assertEqual(config.replace(source=Config().source), Config())
        self.assertEqual(config.source, "empty.ini")

    def test_no_iplist_by_default(self) -> None:
        """Without ``[iplist] servers`` the list is empty (derived from the
        access listeners later)."""
        self.assertEqual(Config().iplist, ())


class ParseTests(SynchronousTestCase):
    def test_every_contract_key_is_parsed_and_coerced(self) -> None:
        """Non-default values of every contract key are read, and numbers and
        booleans come back as ``int`` and ``bool``, not strings."""
        config = parse_config(
            "[store]\n"
            "database = /var/lib/im58d/data.sqlite\n"
            "[listen]\n"
            "access = tcp:6000\n"
            "http = tcp:6080:interface=0.0.0.0\n"
            "[session]\n"
            "linger = 30\n"
            "heartbeat = 60\n"
            "max_devices = 2\n"
            "expire_days = 7\n"
            "[messages]\n"
            "max_body = 100\n"
            "friends_only = yes\n"
            "[admin]\n"
            "token = s3cret\n"
            "[routing]\n"
            "backend = redis\n"
            "redis = tcp:redis.example:6380\n",
            "full.ini",
        )
        self.assertEqual(
            contract_values(config),
            {
                "[store] database": "/var/lib/im58d/data.sqlite",
                "[listen] access": ("tcp:6000",),
                "[listen] http": ("tcp:6080:interface=0.0.0.0",),
                "[session] linger": 30,
                "[session] heartbeat": 60,
                "[session] max_devices": 2,
                "[session] expire_days": 7,
                "[messages] max_body": 100,
                "[messages] friends_only": True,
                "[admin] token": "s3cret",
                "[routing] backend": "redis",
                "[routing] redis": "tcp:redis.example:6380",
            },
        )
        for value in (config.linger, config.heartbeat, config.max_devices, config.expire_days,
                      config.max_body):
            self.assertIs(type(value), int)
        self.assertIs(config.friends_only, True)
        self.assertEqual(config.source, "full.ini")

    def test_other_keys_are_coerced(self) -> None:
        """The documented keys beyond the contract are read and coerced too."""
        config = parse_config(
            "[store]\nsynchronous = full\n"
            "[listen]\nmax_frame = 1024\n"
            "[session]\nlogin_timeout = 30\n"
            "[login]\nuser_attempts = 3\naddress_attempts = 50\nattempt_window = 60\n"
            "[messages]\nretransmit = 5\nmax_body = 512\nbatch_window = 0\n"
        )
        self.assertEqual(config.synchronous, "full")
        self.assertEqual((config.max_body, config.batch_window), (512, 0))
        self.assertEqual(config.max_frame, 1024)
        self.assertEqual(config.login_timeout, 30)
        self.assertEqual(
            (config.user_attempts, config.address_attempts, config.attempt_window),
            (3, 50, 60),
        )
        self.assertEqual(config.retransmit, 5)

    def test_friends_only_words(self) -> None:
        """``friends_only`` takes yes/no and true/false."""
        for word, value in [("yes", True), ("no", False), ("true", True), ("false", False)]:
            config = parse_config(f"[messages]\nfriends_only = {word}\n")
            self.assertIs(config.friends_only, value, word)

    def test_several_access_listeners_one_per_line(self) -> None:
        """``access`` and ``http`` take several endpoints, one per line (as
        INI continuation lines), each comment and blank line dropped."""
        config = parse_config(
            "[listen]\n"
            "access =\n"
            "    tcp:5858:interface=127.0.0.1   ; plain\n"
            "    ssl:5859:privateKey=k.pem:certKey=c.pem\n"
            "\n"
            "    systemd:domain=INET:index=0\n"
            "http = tcp:8058:interface=127.0.0.1\n"
            "    tcp:8059:interface=\\:\\:1\n"
        )
        self.assertEqual(
            config.access,
            (
                "tcp:5858:interface=127.0.0.1",
                "ssl:5859:privateKey=k.pem:certKey=c.pem",
                "systemd:domain=INET:index=0",
            ),
        )
        self.assertEqual(
            config.http, ("tcp:8058:interface=127.0.0.1", "tcp:8059:interface=\\:\\:1")
        )

    def test_admin_token(self) -> None:
        """``[admin] token`` is kept as written; empty means no token."""
        self.assertEqual(parse_config("[admin]\ntoken = abc-123\n").admin_token, "abc-123")
        self.assertEqual(parse_config("[admin]\ntoken =\n").admin_token, "")

    def test_max_body_must_fit_a_frame(self) -> None:
        """A max_body that a frame of max_frame bytes cannot carry is refused,
        naming both keys."""
        error = self.assertRaises(
            ConfigError, parse_config, "[listen]\nmax_frame = 4096\n"
        )
        self.assertIn("[messages] max_body", str(error))
        self.assertIn("[listen] max_frame", str(error))

    def test_routing(self) -> None:
        """``[routing] backend`` is local or redis; ``redis`` is an endpoint."""
        config = parse_config("[routing]\nbackend = redis\nredis = unix:/run/redis.sock\n")
        self.assertEqual(config.routing_backend, "redis")
        self.assertEqual(config.redis, "unix:/run/redis.sock")
        self.assertEqual(parse_config("[routing]\nbackend = local\n").routing_backend, "local")

    def test_iplist_servers(self) -> None:
        """``[iplist] servers`` entries are ``HOST:PORT [tls] [weight=N]``,
        one per line; tls defaults to off and weight to 1."""
        config = parse_config(
            "[iplist]\n"
            "servers = 10.0.0.1:5858 tls weight=3\n"
            "    10.0.0.2:5858\n"
            "    im.example.org:443 tls\n"
            "    10.0.0.4:5858 weight=2\n"
        )
        self.assertEqual(
            config.iplist,
            (
                AccessServer("10.0.0.1", 5858, tls=True, weight=3),
                AccessServer("10.0.0.2", 5858, tls=False, weight=1),
                AccessServer("im.example.org", 443, tls=True, weight=1),
                AccessServer("10.0.0.4", 5858, tls=False, weight=2),
            ),
        )

    def test_inline_comments(self) -> None:
        """A ``;`` after whitespace starts a comment, on any key."""
        config = parse_config(
            "[session]\nlinger = 12 ; seconds\n"
            "[messages]\nfriends_only = true   ; only friends\n"
            "[admin]\ntoken = t0ken ; secret\n"
        )
        self.assertEqual(config.linger, 12)
        self.assertIs(config.friends_only, True)
        self.assertEqual(config.admin_token, "t0ken")

    def test_percent_is_literal(self) -> None:
        """``%`` in a value is kept literally (no interpolation)."""
        self.assertEqual(parse_config("[admin]\ntoken = a%b%(c)s\n").admin_token, "a%b%(c)s")


class ParseErrorTests(SynchronousTestCase):
    def assertConfigError(self, text: str, *names: str) -> str:
        """``text`` is refused with one line naming the file and ``names``."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "/etc/im58d/bad.ini")
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn("/etc/im58d/bad.ini", message)
        for name in names:
            self.assertIn(name, message)
        return message

    def test_unknown_section(self) -> None:
        """An unknown section is refused, naming the section."""
        self.assertConfigError("[sesion]\nlinger = 3\n", "[sesion]")

    def test_unknown_key(self) -> None:
        """An unknown key in a known section is refused, naming ``[section] key``."""
        self.assertConfigError("[session]\nlingr = 3\n", "[session] lingr")

    def test_key_of_another_section(self) -> None:
        """A known key in the wrong section is an unknown key there."""
        self.assertConfigError("[store]\nlinger = 3\n", "[store] linger")

    def test_bad_int(self) -> None:
        """A number that is not a whole number is refused, naming the key and value."""
        self.assertConfigError("[session]\nlinger = 5m\n", "[session] linger", "5m")
        self.assertConfigError("[messages]\nmax_body = 1.5\n", "[messages] max_body")
        self.assertConfigError("[session]\nheartbeat =\n", "[session] heartbeat")

    def test_out_of_range_int(self) -> None:
        """A whole number outside the key's range is refused, naming the key."""
        self.assertConfigError("[session]\nlinger = -1\n", "[session] linger", "-1")
        self.assertConfigError("[session]\nheartbeat = 0\n", "[session] heartbeat")
        self.assertConfigError("[messages]\nmax_body = 0\n", "[messages] max_body")
        self.assertConfigError(
            "[messages]\nmax_body = 999999999999\n", "[messages] max_body"
        )

    def test_session_limits(self) -> None:
        """``max_devices`` is a whole number in 1..100 and ``expire_days`` in
        1..36500; the ends of the ranges are taken, anything else refused
        naming the key and the value."""
        for key, low, high in (("max_devices", 1, 100), ("expire_days", 1, 36500)):
            for value in (low, high):
                config = parse_config(f"[session]\n{key} = {value}\n")
                self.assertEqual(getattr(config, key), value)
            for bad in (str(low - 1), str(high + 1), "-1", "5.0", "five", "", "1e2"):
                self.assertConfigError(f"[session]\n{key} = {bad}\n", f"[session] {key}", bad)

    def test_bad_bool(self) -> None:
        """``friends_only`` refuses anything but a yes/no word."""
        self.assertConfigError(
            "[messages]\nfriends_only = sometimes\n", "[messages] friends_only", "sometimes"
        )
        self.assertConfigError("[messages]\nfriends_only =\n", "[messages] friends_only")

    def test_bad_choice(self) -> None:
        """``[routing] backend`` refuses anything but local or redis."""
        self.assertConfigError(
            "[routing]\nbackend = memcached\n", "[routing] backend", "memcached"
        )
        self.assertConfigError("[store]\nsynchronous = off\n", "[store] synchronous")

    def test_empty_required_text(self) -> None:
        """An empty database path or listener list is refused, naming the key."""
        self.assertConfigError("[store]\ndatabase =\n", "[store] database")
        self.assertConfigError("[listen]\naccess =\n", "[listen] access")
        self.assertConfigError("[listen]\nhttp = ; none\n", "[listen] http")

    def test_bad_iplist_entry(self) -> None:
        """A malformed ``[iplist] servers`` entry is refused, naming the key."""
        for entry in ["10.0.0.1", "10.0.0.1:http", "10.0.0.1:70000", "10.0.0.1:5858 fast",
                      "10.0.0.1:5858 weight=0", "10.0.0.1:5858 weight=x"]:
            self.assertConfigError(f"[iplist]\nservers = {entry}\n", "[iplist] servers")

    def test_default_section_is_refused(self) -> None:
        """A ``[DEFAULT]`` section is not special: it is an unknown section,
        so its keys cannot leak into every section."""
        self.assertConfigError("[DEFAULT]\nlinger = 3\n[session]\n", "[DEFAULT]")

    def test_duplicate_key(self) -> None:
        """A key given twice in one section is refused, in one line naming it."""
        self.assertConfigError("[session]\nlinger = 1\nlinger = 2\n", "linger", "session")

    def test_key_before_any_section(self) -> None:
        """Text before the first section header is refused in one line."""
        self.assertConfigError("linger = 1\n[session]\n")

    def test_first_bad_key_is_named(self) -> None:
        """With several errors, the message is about the first one."""
        message = self.assertConfigError(
            "[session]\nlinger = x\n[messages]\nmax_body = y\n", "[session] linger"
        )
        self.assertNotIn("max_body", message)


class LoadConfigTests(ConfigFileTestCase):
    def test_load_file(self) -> None:
        """``load_config`` reads a file and records its path as the source."""
        path = self.write_config("[session]\nlinger = 7\n")
        config = load_config(path)
        self.assertEqual(config.linger, 7)
        self.assertEqual(config.source, path)

    def test_error_names_the_file(self) -> None:
        """A bad value in a file is reported with the file's path and the key."""
        path = self.write_config("[messages]\nfriends_only = maybe\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        message = str(caught.exception)
        self.assertIn(path, message)
        self.assertIn("[messages] friends_only", message)
        self.assertNotIn("\n", message)

    def test_missing_file(self) -> None:
        """A file that does not exist is a ``ConfigError`` naming it."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(path, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_directory(self) -> None:
        """A directory instead of a file is a ``ConfigError`` naming it."""
        path = self.mktemp()
        os.mkdir(path)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(path, str(caught.exception))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is a ``ConfigError``, not a traceback."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"[admin]\ntoken = \xff\xfe\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(path, str(caught.exception))


class OptionsTests(ConfigFileTestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_no_options_gives_defaults(self) -> None:
        """``twistd -n im58d`` alone runs on the embedded defaults."""
        self.assertEqual(self.parse().config, Config())

    def test_config_file(self) -> None:
        """``--config FILE`` reads the file."""
        path = self.write_config(
            "[listen]\naccess = tcp:7000\n    tcp:7001\n[session]\nlinger = 9\n"
        )
        config = self.parse("--config", path).config
        self.assertEqual(config.access, ("tcp:7000", "tcp:7001"))
        self.assertEqual(config.linger, 9)
        self.assertEqual(config.source, path)

    def test_database_replaces_the_config_value(self) -> None:
        """``--database`` replaces ``[store] database``, the rest of the file stays."""
        path = self.write_config("[store]\ndatabase = file.sqlite\n[session]\nlinger = 9\n")
        config = self.parse("--config", path, "--database", "cli.sqlite").config
        self.assertEqual(config.database, "cli.sqlite")
        self.assertEqual(config.linger, 9)
        self.assertEqual(self.parse("--database", "x.sqlite").config.database, "x.sqlite")

    def test_repeated_access_and_http_replace_the_config_listeners(self) -> None:
        """Repeated ``--access``/``--http`` give exactly the command line's
        listeners, in order, instead of the file's."""
        path = self.write_config(
            "[listen]\naccess = tcp:7000\n    tcp:7001\nhttp = tcp:7080\n    tcp:7081\n"
        )
        config = self.parse(
            "--config", path,
            "--access", "tcp:9000", "--access", "tcp:9001:interface=127.0.0.2",
            "--http", "tcp:9080",
        ).config
        self.assertEqual(config.access, ("tcp:9000", "tcp:9001:interface=127.0.0.2"))
        self.assertEqual(config.http, ("tcp:9080",))

    def test_access_alone_keeps_the_other_defaults(self) -> None:
        """``--access`` without ``--http`` leaves HTTP on its default."""
        config = self.parse("--access", "tcp:9000").config
        self.assertEqual(config.access, ("tcp:9000",))
        self.assertEqual(config.http, Config().http)

    def test_bad_config_file_is_one_line(self) -> None:
        """A bad key stops the start with one line ``im58d: ...`` naming it."""
        path = self.write_config("[session]\nheartbeat = often\n")
        with self.assertRaises(SystemExit) as caught:
            self.parse("--config", path)
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("im58d:"), message)
        self.assertNotIn("\n", message)
        self.assertIn("[session] heartbeat", message)
        self.assertIn(path, message)

    def test_unknown_key_in_config_file_is_one_line(self) -> None:
        """An unknown key stops the start with one line naming it."""
        path = self.write_config("[listen]\nport = 5858\n")
        with self.assertRaises(SystemExit) as caught:
            self.parse("--config", path)
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("im58d:"), message)
        self.assertNotIn("\n", message)
        self.assertIn("[listen] port", message)

    def test_redis_backend_is_accepted(self) -> None:
        """backend = redis with a Redis endpoint starts (several nodes)."""
        path = self.write_config(
            "[routing]\nbackend = redis\nredis = tcp:10.0.0.5:6380\nnode_ttl = 5\nweight = 3\n"
        )
        config = self.parse("--config", path).config
        self.assertEqual(config.routing_backend, "redis")
        self.assertEqual(config.redis, "tcp:10.0.0.5:6380")
        self.assertEqual((config.node_ttl, config.weight), (5, 3))

    def test_bad_redis_endpoint_is_one_line(self) -> None:
        """A Redis endpoint that is not a client endpoint, misses its host,
        port or path, or has a port out of range, stops the start with one
        line naming [routing] redis."""
        for value in ("127.0.0.1:6379", "tcp:127.0.0.1", "ssl:host:1", "tcp:127.0.0.1:99999",
                      "unix:", "tcp::6379"):
            path = self.write_config(f"[routing]\nbackend = redis\nredis = {value}\n")
            with self.assertRaises(SystemExit) as caught:
                self.parse("--config", path)
            message = str(caught.exception.code)
            self.assertNotIn("\n", message)
            self.assertIn("[routing] redis", message, value)

    def test_missing_config_file_is_one_line(self) -> None:
        """A config file that cannot be read stops the start with one line."""
        path = self.mktemp()
        with self.assertRaises(SystemExit) as caught:
            self.parse("--config", path)
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("im58d:"), message)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)


class ExampleFileTests(SynchronousTestCase):
    """``etc/im58d.ini``, the documented example every operator starts from."""

    PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "etc", "im58d.ini")

    def read(self) -> str:
        with open(self.PATH, encoding="utf-8") as f:
            return f.read()

    def test_documents_every_key(self) -> None:
        """Every key the daemon reads is in the example, under its section,
        with a comment in its paragraph (set, or commented out when it has
        no default value); the example names no key the daemon does not
        read."""
        section = ""
        found: dict[tuple[str, str], bool] = {}
        commented = False  # the paragraph so far has a comment
        for line in self.read().splitlines():
            stripped = line.strip()
            header = re.fullmatch(r"\[(\w+)\]", stripped)
            if header or not stripped:
                section = header.group(1) if header else section
                commented = False
                continue
            key = re.fullmatch(r"(;\s*)?(\w+)\s*=.*", stripped)
            if section and key and not line.startswith((" ", "\t")):
                found.setdefault((section, key.group(2)), commented)
            commented = commented or stripped.startswith(";")
        schema = {(section, key) for section, keys in SCHEMA.items() for key in keys}
        self.assertEqual(schema - set(found), set(), "keys missing from etc/im58d.ini")
        self.assertEqual(set(found) - schema, set(), "keys etc/im58d.ini has and SCHEMA not")
        self.assertEqual([k for k, documented in found.items() if not documented], [],
                         "keys without a comment")

    def test_values_are_the_defaults(self) -> None:
        """The example parses, and its values are the embedded defaults."""
        config = parse_config(self.read(), self.PATH)
        self.assertEqual(config.replace(source=Config().source), Config())

    def test_session_keys_documented(self) -> None:
        """The example sets max_devices and expire_days to their defaults."""
        text = self.read()
        self.assertRegex(text, r"\nmax_devices = 5\n")
        self.assertRegex(text, r"\nexpire_days = 90\n")


class MakeServiceTests(SynchronousTestCase):
    def options(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def assertFails(self, options: tap.Options, *names: str) -> str:
        """``makeService`` stops with one line ``im58d: ...`` naming ``names``."""
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options, reactor=MemoryReactor())
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("im58d:"), message)
        self.assertNotIn("\n", message)
        for name in names:
            self.assertIn(name, message)
        return message

    def test_builds_a_service(self) -> None:
        """With a usable database ``makeService`` assembles a service with
        one listener per endpoint, without listening yet, and prepares the
        database's schema."""
        database = self.mktemp()
        reactor = MemoryReactor()
        service = tap.makeService(
            self.options(
                "--database", database,
                "--access", "tcp:0:interface=127.0.0.1",
                "--access", "tcp:0:interface=127.0.0.2",
                "--http", "tcp:0:interface=127.0.0.1",
            ),
            reactor=reactor,
        )
        self.assertTrue(IService.providedBy(service))
        self.assertFalse(service.running)
        assert isinstance(service, MultiService)
        listeners = [s for s in service if isinstance(s, tap.ListenerService)]
        self.assertEqual(len(listeners), 3)
        self.assertEqual(reactor.tcpServers, [])
        conn = sqlite3.connect(database)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
        self.assertGreaterEqual(version, 1)
        self.assertIn("users", tables)

    def test_missing_certificate(self) -> None:
        """An ``ssl:`` listener whose key/certificate files are missing stops
        the start with one line naming ``[listen] access``."""
        missing = os.path.abspath(self.mktemp())
        self.assertFails(
            self.options(
                "--database", self.mktemp(),
                "--access", f"ssl:0:privateKey={missing}.key:certKey={missing}.pem",
            ),
            "[listen] access",
        )

    def test_nonsense_endpoint(self) -> None:
        """An endpoint string Twisted does not understand stops the start with
        one line naming the key and the string."""
        self.assertFails(
            self.options("--database", self.mktemp(), "--access", "carrier-pigeon:5858"),
            "[listen] access", "carrier-pigeon:5858",
        )
        self.assertFails(
            self.options("--database", self.mktemp(), "--http", "tcp:eighty"),
            "[listen] http", "tcp:eighty",
        )

    def test_database_in_missing_directory(self) -> None:
        """A database path inside a directory that does not exist stops the
        start with one line naming ``[store] database``."""
        path = os.path.join(self.mktemp(), "im58d.sqlite")
        self.assertFails(self.options("--database", path), "[store] database", path)

    def test_database_is_a_directory(self) -> None:
        """A database path that is a directory stops the start with one line
        naming ``[store] database``."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertFails(self.options("--database", path), "[store] database")

    def test_database_is_created_private(self) -> None:
        """The database file the daemon creates is readable and writable by
        its owner only: it holds every session key."""
        path = self.mktemp()
        tap.makeService(self.options("--database", path), reactor=MemoryReactor())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_readable_database_is_refused(self) -> None:
        """A database file that group or others may read or write stops the
        start with one line naming ``[store] database`` and ``chmod 600``."""
        path = self.mktemp()
        tap.makeService(self.options("--database", path), reactor=MemoryReactor())
        for mode in (0o644, 0o640, 0o606):
            os.chmod(path, mode)
            message = self.assertFails(self.options("--database", path), "[store] database")
            self.assertIn(f"chmod 600 {path}", message)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), mode)
        os.chmod(path, 0o600)
        tap.makeService(self.options("--database", path), reactor=MemoryReactor())

    def test_newer_schema_is_refused(self) -> None:
        """A database written by a newer im58d (higher schema version) is
        refused with one line saying so, and is left at its version."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 999")
        conn.close()
        os.chmod(path, 0o600)
        message = self.assertFails(self.options("--database", path), "[store] database")
        self.assertIn("999", message)
        self.assertIn("newer", message)
        conn = sqlite3.connect(path)
        try:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 999)
        finally:
            conn.close()
