"""Hearth's container images, built with no image registry: ``python -m deploy.images build``.

No image registry is reachable from the machines Hearth is built on, only the package registries
(Debian's mirror, PyPI, Maven Central). So every image starts from a base made here:

- ``hearth/base:bookworm``: ``debootstrap --variant=minbase bookworm`` from the mirror apt already
  uses, turned into an image with ``docker import``;
- ``hearth/hearth``: the services, the web pages and the ``hearth`` CLI (``deploy/Dockerfile``),
  Python dependencies installed from PyPI inside the build;
- ``hearth/kafka``: Apache Kafka 4.1.1 on Debian's Java, from the Maven Central jars the launcher
  already keeps in ``~/.cache/hearth/kafka-4.1.1/libs`` (copied into the build context);
- ``hearth/postgres``: Debian's PostgreSQL server.

Every build runs with ``--network host`` (the engine has no bridge). Each image is tagged with the
SHA-256 of its inputs (its Dockerfile and context files, its parent image's id) and labelled with
it; a build whose key already exists is skipped, so a rebuild with nothing changed takes seconds.
The stable tags (``hearth/hearth:latest``, ``hearth/kafka:4.1.1``, ``hearth/postgres:15``) always
point at the newest build.

``python -m deploy.images dockerd start|stop|status`` runs the one Docker engine Hearth's CI needs
(as root: no bridge, no iptables, its own data root, pidfile and log file) and stops it again only
if it was the one that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KAFKA_VERSION = "4.1.1"
PG_MAJOR = "15"  # bookworm's server

BASE_IMAGE = "hearth/base:bookworm"
HEARTH_IMAGE = "hearth/hearth:latest"
KAFKA_IMAGE = f"hearth/kafka:{KAFKA_VERSION}"
POSTGRES_IMAGE = f"hearth/postgres:{PG_MAJOR}"
LABEL = "org.hearth.inputs"
LABEL_RUN = "org.hearth.test-run"  # set by hearth_testing.containers

DOCKERD_DATA_ROOT = Path(os.environ.get("HEARTH_DOCKERD_DATA_ROOT", "/var/lib/hearth-docker"))
DOCKERD_PIDFILE = Path("/run/hearth-dockerd.pid")
DOCKERD_LOG = Path(os.environ.get("HEARTH_DOCKERD_LOG", "/var/log/hearth-dockerd.log"))
DOCKERD_MARK = Path("/run/hearth-dockerd.started-by-hearth")


class ImageError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"images: {msg}", flush=True)


def docker(*args: str, check: bool = True, capture: bool = True, input: bytes | None = None,
           ) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run(["docker", *args], capture_output=capture, input=input)
    if check and res.returncode != 0:
        err = (res.stderr or b"").decode(errors="replace")[-3000:]
        raise ImageError(f"docker {' '.join(args[:3])} failed: {err}")
    return res


def engine_up() -> bool:
    """Whether a Docker engine answers (``docker info``)."""
    if not shutil.which("docker"):
        return False
    try:
        res = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and bool(res.stdout.strip())


def image_id(ref: str) -> str | None:
    res = docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return res.stdout.decode().strip() or None if res.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# dockerd
# ---------------------------------------------------------------------------------------------


def dockerd_start(timeout: float = 90) -> bool:
    """Start dockerd when no engine answers. Returns True when this call started it."""
    if engine_up():
        _log("a Docker engine is already running; using it")
        return False
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise ImageError("dockerd not found: bash deploy/system-deps.sh containers")
    if os.geteuid() != 0:
        raise ImageError("dockerd must be started as root (or start a Docker engine yourself)")
    DOCKERD_DATA_ROOT.mkdir(parents=True, exist_ok=True)
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    argv = [dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false",
            f"--data-root={DOCKERD_DATA_ROOT}", f"--pidfile={DOCKERD_PIDFILE}"]
    with open(DOCKERD_LOG, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ImageError(f"dockerd exited with code {proc.returncode}; see {DOCKERD_LOG}")
        if engine_up():
            DOCKERD_MARK.write_text(str(proc.pid))
            _log(f"dockerd started (pid {proc.pid}, data root {DOCKERD_DATA_ROOT}, log {DOCKERD_LOG})")
            return True
        time.sleep(0.5)
    proc.terminate()
    raise ImageError(f"dockerd did not answer within {timeout:.0f}s; see {DOCKERD_LOG}")


def dockerd_stop(timeout: float = 60) -> None:
    """Stop dockerd if ``dockerd_start`` started it (its mark file names the pid); else do nothing."""
    if not DOCKERD_MARK.exists():
        _log("dockerd was not started by Hearth; leaving it alone")
        return
    try:
        pid = int(DOCKERD_MARK.read_text().strip())
    except ValueError:
        DOCKERD_MARK.unlink()
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises ProcessLookupError once it is gone
            # A zombie of a parent that exited is reaped by init; check /proc for the state.
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            time.sleep(0.3)
        else:
            os.kill(pid, signal.SIGKILL)
    DOCKERD_MARK.unlink(missing_ok=True)
    _log(f"dockerd (pid {pid}) stopped")


# ---------------------------------------------------------------------------------------------
# Content keys
# ---------------------------------------------------------------------------------------------


def _files(root: Path, rel: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for r in rel:
        p = root / r
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                          and not f.name.endswith(".pyc"))
        elif p.is_file():
            out.append(p)
    return out


def content_key(context: Path, *extra: str) -> str:
    h = hashlib.sha256()
    for e in extra:
        h.update(e.encode() + b"\0")
    for f in sorted(p for p in context.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(context)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def apt_mirror() -> str:
    """The Debian mirror apt on this machine uses (deb822 ``URIs:`` or a one-line ``deb`` entry)."""
    env = os.environ.get("HEARTH_DEBIAN_MIRROR")
    if env:
        return env
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
                if m.group(1).rstrip("/").endswith("/debian"):
                    return m.group(1).rstrip("/")
            for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
                return m.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


def host_ca_bundle() -> Path | None:
    """The host's CA bundle, so that pip inside a build trusts what the host trusts (a TLS-inspecting
    egress proxy's CA is installed on the host, not in a fresh Debian)."""
    for c in (os.environ.get("HEARTH_BUILD_CA_BUNDLE"), "/etc/ssl/certs/ca-certificates.crt"):
        if c and Path(c).is_file():
            return Path(c)
    return None


# ---------------------------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------------------------

BASE_RECIPE_VERSION = "1"  # bump when the base's recipe changes in a way base_files does not show


def base_files(mirror: str) -> dict[str, str]:
    """Files written into the debootstrapped root: apt sources with security updates; smaller layers
    (no docs, no recommends) for everything installed on top."""
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    return {
        "etc/apt/sources.list": f"deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n"
                                f"deb {security} bookworm-security main\n",
        "etc/dpkg/dpkg.cfg.d/01-hearth-nodoc": "path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\n"
                                               "path-exclude /usr/share/locale/*\n",
        "etc/apt/apt.conf.d/01-hearth": 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n',
    }


@dataclass
class Result:
    name: str
    ref: str
    key: str
    built: bool
    seconds: float


@dataclass
class Builder:
    refresh: bool = False
    results: list[Result] = field(default_factory=list)

    def _cached(self, name: str, repo: str, key: str, stable: str) -> Result | None:
        ref = f"{repo}:{key[:16]}"
        if not self.refresh and image_id(ref):
            docker("tag", ref, stable)
            return Result(name, stable, key, False, 0.0)
        return None

    def base(self) -> Result:
        started = time.monotonic()
        mirror = apt_mirror()
        files = base_files(mirror)
        recipe = [BASE_RECIPE_VERSION, "debootstrap --variant=minbase bookworm", mirror, *sorted(files.items())]
        key = hashlib.sha256(repr(recipe).encode()).hexdigest()
        hit = self._cached("base", "hearth/base", key, BASE_IMAGE)
        if hit:
            self.results.append(hit)
            return hit
        if not shutil.which("debootstrap") and not Path("/usr/sbin/debootstrap").exists():
            raise ImageError("debootstrap not found: bash deploy/system-deps.sh containers")
        _log(f"debootstrap --variant=minbase bookworm from {mirror} ...")
        tmp = Path(tempfile.mkdtemp(prefix="hearth-rootfs-", dir="/var/tmp"))  # noqa: S108
        try:
            rootfs = tmp / "rootfs"
            res = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror],
                                 capture_output=True)
            if res.returncode != 0:
                raise ImageError("debootstrap failed: " + (res.stdout + res.stderr).decode(errors="replace")[-3000:])
            for rel, text in files.items():
                (rootfs / rel).write_text(text)
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (rootfs / junk).glob("*"):
                    if f.is_file():
                        f.unlink()
            ref = f"hearth/base:{key[:16]}"
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            imp = subprocess.run(["docker", "import", "--change", f"LABEL {LABEL}={key}",
                                  "--change", 'CMD ["/bin/bash"]', "-", ref], stdin=tar.stdout, capture_output=True)
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
            if imp.returncode != 0 or tar.returncode != 0:
                raise ImageError("docker import failed: " + imp.stderr.decode(errors="replace")[-2000:])
            docker("tag", ref, BASE_IMAGE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        r = Result("base", BASE_IMAGE, key, True, time.monotonic() - started)
        self.results.append(r)
        return r

    def build(self, name: str, repo: str, stable: str, dockerfile: Path, context: Path) -> Result:
        started = time.monotonic()
        parent = image_id(BASE_IMAGE)
        if not parent:
            raise ImageError(f"{BASE_IMAGE} is missing")
        shutil.copy(dockerfile, context / "Dockerfile")
        key = content_key(context, parent)
        hit = self._cached(name, repo, key, stable)
        if hit:
            self.results.append(hit)
            return hit
        ref = f"{repo}:{key[:16]}"
        _log(f"building {stable} ({ref}) ...")
        res = subprocess.run(["docker", "build", "--force-rm", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}",
                              "--label", f"{LABEL}={key}", "-t", ref, "-t", stable, str(context)],
                             capture_output=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
        if res.returncode != 0:
            out = (res.stdout + res.stderr).decode(errors="replace")
            raise ImageError(f"building {stable} failed:\n{out[-4000:]}")
        r = Result(name, stable, key, True, time.monotonic() - started)
        self.results.append(r)
        return r

    def hearth(self) -> Result:
        with tempfile.TemporaryDirectory(prefix="hearth-ctx-") as d:
            ctx = Path(d)
            for f in _files(ROOT, ["pyproject.toml", "README.md", "shared", "services", "deploy", "hearth_testing"]):
                rel = f.relative_to(ROOT)
                if rel.parts[0] == "deploy" and rel.parts[1:2] == ("k8s",):
                    continue
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
            import tomllib

            deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            (ctx / "requirements.txt").write_text("".join(f"{d}\n" for d in deps))
            ca = host_ca_bundle()
            (ctx / "build-ca.pem").write_bytes(ca.read_bytes() if ca else b"")
            return self.build("hearth", "hearth/hearth", HEARTH_IMAGE, DEPLOY / "Dockerfile", ctx)

    def kafka(self) -> Result:
        from deploy.launcher import kafka_libs

        libs = kafka_libs(KAFKA_VERSION)
        with tempfile.TemporaryDirectory(prefix="hearth-ctx-") as d:
            ctx = Path(d)
            shutil.copytree(libs, ctx / "libs", ignore=shutil.ignore_patterns(".complete"))
            for f in ("log4j2.properties", "server.properties.template", "entrypoint.sh"):
                shutil.copy2(DEPLOY / "kafka" / f, ctx / f)
            return self.build("kafka", "hearth/kafka", KAFKA_IMAGE, DEPLOY / "kafka" / "Dockerfile", ctx)

    def postgres(self) -> Result:
        with tempfile.TemporaryDirectory(prefix="hearth-ctx-") as d:
            ctx = Path(d)
            shutil.copy2(DEPLOY / "postgres" / "entrypoint.sh", ctx / "entrypoint.sh")
            return self.build("postgres", "hearth/postgres", POSTGRES_IMAGE, DEPLOY / "postgres" / "Dockerfile", ctx)


def cleanup() -> None:
    """Remove what Hearth's test runs left on the engine: containers labelled by hearth_testing, and
    compose projects named hearth-ci-* or hearth-test-* with their volumes."""
    fmt = '{{.ID}} {{.Label "com.docker.compose.project"}} {{.Label "' + LABEL_RUN + '"}}'
    res = docker("ps", "-a", "--format", fmt, check=False)
    ids, projects = [], set()
    for line in res.stdout.decode().splitlines():
        cid, _, rest = line.partition(" ")
        project, _, run = rest.partition(" ")
        if run.strip() or project.startswith(("hearth-ci-", "hearth-test-")):
            ids.append(cid)
            if project:
                projects.add(project)
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)
        _log(f"removed {len(ids)} leftover container(s)")
    vols = docker("volume", "ls", "-q", check=False).stdout.decode().split()
    stale = [v for v in vols if any(v.startswith(p.replace("-", "") + "_") or v.startswith(p + "_") for p in projects)]
    if stale:
        docker("volume", "rm", "-f", *stale, check=False)


def prune_superseded(results: list[Result]) -> None:
    """Remove the keyed tags older builds left (``repo:<key>`` other than the current key), and the
    layers only they used; an image a container still uses stays."""
    for r in results:
        repo = r.ref.split(":", 1)[0]
        res = docker("image", "ls", repo, "--format", "{{.Tag}}", check=False)
        old = [f"{repo}:{t}" for t in res.stdout.decode().split()
               if re.fullmatch(r"[0-9a-f]{16}", t) and t != r.key[:16]]
        if old:
            docker("rmi", *old, check=False)
    docker("image", "prune", "-f", check=False)


def build_all(only: list[str] | None = None, refresh: bool = False) -> list[Result]:
    if not engine_up():
        raise ImageError("no Docker engine answers: start one (as root: python -m deploy.images dockerd start)")
    b = Builder(refresh=refresh)
    b.base()
    for name in only or ["postgres", "kafka", "hearth"]:
        getattr(b, name)()
    prune_superseded(b.results)
    return b.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.images", description="Hearth's container images.")
    sub = parser.add_subparsers(dest="command", required=True)
    pb = sub.add_parser("build", help="build what changed (base, postgres, kafka, hearth)")
    pb.add_argument("names", nargs="*", metavar="postgres|kafka|hearth", help="only these (default: all)")
    pb.add_argument("--refresh", action="store_true", help="rebuild even when the content key exists")
    sub.add_parser("cleanup", help="remove containers and compose projects Hearth's test runs left behind")
    pd = sub.add_parser("dockerd", help="start/stop the Docker engine for CI")
    pd.add_argument("action", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            unknown = set(args.names) - {"postgres", "kafka", "hearth"}
            if unknown:
                parser.error(f"unknown image(s): {', '.join(sorted(unknown))}")
            started = time.monotonic()
            for r in build_all(args.names or None, refresh=args.refresh):
                how = f"built in {r.seconds:.1f}s" if r.built else "cached"
                _log(f"{r.ref:<24} {how:<18} inputs {r.key[:16]}")
            _log(f"done in {time.monotonic() - started:.1f}s")
        elif args.command == "cleanup":
            cleanup()
        elif args.action == "start":
            dockerd_start()
        elif args.action == "stop":
            dockerd_stop()
        else:
            print("running" if engine_up() else "not running")
    except ImageError as exc:
        print(f"images: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
