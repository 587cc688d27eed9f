#!/usr/bin/env python3
"""Run a real single-node Apache Kafka broker (KRaft) for development, tests and CI.

No Docker needed: the broker jars come from Maven Central (through `mvn`) the
first time, into a cache outside git, and the broker runs as a detached JVM.

Commands:
  start     ensure a broker answers on 127.0.0.1:PORT; returns once a Kafka
            client can really talk to it (ApiVersions + Metadata show the
            broker registered). If a broker already answers there, it is
            reused and left as it is.
  stop      stop the broker this script started on PORT (SIGTERM, then SIGKILL
            after --timeout). A broker started some other way is left alone.
  restart   stop, then start on the same data: topics and offsets survive.
  status    print whether a broker answers on PORT; exit 0 if so, 1 if not.
  logs      print the tail of the broker's log files.

Data: each port has its own data dir, $TALLY_CACHE_DIR/kafka-data-PORT
(default ~/.cache/tally/kafka-data-PORT), holding server.properties, the
topic data (log/), server.log, broker.out and the pid file. `start` KEEPS an
existing formatted data dir (so `restart`, or stop + start, keeps topics);
`start --fresh` wipes it first and formats a new cluster (only when no broker
of ours is running; stop it first). Delete the data dir by hand at any time
when no broker runs.

Environment:
  TALLY_KAFKA_PORT   default port (9092)
  TALLY_CACHE_DIR    cache root (default ~/.cache/tally): jars in
                     kafka-<version>/libs, Maven repository in m2/
  JAVA_HOME          JDK to use (else `java` on PATH); Java 11+ needed
  TALLY_KAFKA_HEAP   JVM heap flags (default "-Xms256m -Xmx512m")

Only the Python standard library is used: this runs before any venv exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

KAFKA_VERSION = "3.9.1"
SCALA_VERSION = "2.13"
SLF4J_VERSION = "1.7.36"  # the slf4j-api line kafka 3.9 is built against
RELOAD4J_VERSION = "1.2.25"  # the log4j 1.x fork kafka 3.9 ships in its tarball
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
HOST = "127.0.0.1"
PROG = os.environ.get("TALLY_BROKER_PROG") or "python -m tally.consumers.demo.broker"
"""How the user runs this launcher (for messages): `scripts/kafka` in a checkout."""
NODE_ID = 1
DEFAULT_PORT = 9092
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def say(msg: str) -> None:
    print(f"kafka: {msg}", flush=True)


def die(msg: str, code: int = 1) -> NoReturn:
    print(f"kafka: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---------------------------------------------------------------- paths


def cache_root() -> Path:
    env = os.environ.get("TALLY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tally"


def libs_dir() -> Path:
    return cache_root() / f"kafka-{KAFKA_VERSION}" / "libs"


def data_dir(port: int) -> Path:
    return cache_root() / f"kafka-data-{port}"


class Paths:
    def __init__(self, port: int) -> None:
        self.data = data_dir(port)
        self.props = self.data / "server.properties"
        self.log4j = self.data / "log4j.properties"
        self.logs = self.data / "log"  # topic partitions + KRaft metadata log
        self.pid = self.data / "kafka.pid"
        self.state = self.data / "tally-kafka.json"
        self.server_log = self.data / "server.log"
        self.out = self.data / "broker.out"
        self.lock = cache_root() / f"kafka-{port}.lock"


@contextlib.contextmanager
def port_lock(paths: Paths) -> Iterator[None]:
    """Serialise start/stop/restart on one port across processes."""
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another scripts/kafka command is working on this port; waiting for it...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- kafka protocol (stdlib)


class ProtocolError(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _request(sock: socket.socket, api_key: int, api_version: int, body: bytes) -> bytes:
    """Send one request (header v1, non-flexible) and return the response body."""
    correlation_id = random.randint(1, 2**31 - 1)
    client_id = b"tally-scripts-kafka"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    if size < 4 or size > 64 * 1024 * 1024:
        raise ProtocolError(f"implausible response size {size}: not a Kafka broker?")
    resp = _recv_exact(sock, size)
    (cid,) = struct.unpack_from(">i", resp, 0)
    if cid != correlation_id:
        raise ProtocolError("correlation id mismatch: not a Kafka broker?")
    return resp[4:]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s


def probe(port: int, timeout: float = 3.0) -> dict[str, Any]:
    """Talk Kafka to HOST:port. Returns {"ok": bool, "reason": str, "brokers": [...]}.

    ok means: ApiVersions answers without error AND Metadata lists at least one
    registered (unfenced) broker, i.e. clients can produce/consume/create topics.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            # ApiVersions v0 (api key 18): every broker version answers it.
            r = _Reader(_request(sock, 18, 0, b""))
            err = r.take(">h")
            if err:
                return {"ok": False, "reason": f"ApiVersions error code {err}", "brokers": []}
            apis = {}
            for _ in range(r.take(">i")):
                key, lo, hi = r.take(">hhh")
                apis[key] = (lo, hi)
            if 3 not in apis:
                return {"ok": False, "reason": "broker lists no Metadata API", "brokers": []}
            lo, hi = apis[3]
            if lo <= 1 <= hi:
                version, body = 1, struct.pack(">i", 0)  # empty topic list
            elif lo <= 4 <= hi:
                version, body = 4, struct.pack(">ib", 0, 0)  # + allow_auto_topic_creation
            else:
                return {"ok": True, "reason": f"Metadata v{lo}-{hi} (not probed)", "brokers": []}
            r = _Reader(_request(sock, 3, version, body))
            if version >= 3:
                r.take(">i")  # throttle_time_ms
            brokers = []
            for _ in range(r.take(">i")):
                node_id = r.take(">i")
                host = r.string()
                bport = r.take(">i")
                r.string()  # rack
                brokers.append((node_id, host, bport))
            if version >= 2:
                r.string()  # cluster_id
            controller_id = r.take(">i")
            if not brokers:
                return {"ok": False, "reason": "no broker registered yet", "brokers": []}
            return {"ok": True, "reason": f"controller {controller_id}", "brokers": brokers}
    except (OSError, ProtocolError, struct.error) as exc:
        return {"ok": False, "reason": f"{type(exc).__name__}: {exc}", "brokers": []}


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- processes


def _cmdline(pid: int) -> str | None:
    """The command line of a live (non-zombie) process, or None."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
            return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    if sys.platform.startswith("linux"):
        return None
    try:  # macOS and friends
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "stat=", "-o", "command="],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return None
    if not out or out.split()[0].startswith("Z"):
        return None
    return out.split(None, 1)[1] if " " in out else out


def our_pid(paths: Paths) -> int | None:
    """The pid in the pid file if it is still our java kafka.Kafka process."""
    try:
        pid = int(paths.pid.read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    if cmd and "java" in cmd and "kafka.Kafka" in cmd and str(paths.props) in cmd:
        return pid
    return None


def alive(pid: int) -> bool:
    return _cmdline(pid) is not None


def java_bin() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return str(Path(home, "bin", "java"))
    found = shutil.which("java")
    if not found:
        die(
            "no `java` found: install a JDK 11+ (e.g. apt-get install openjdk-17-jre-headless) "
            "or set JAVA_HOME"
        )
    return found


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def print_log_tails(paths: Paths, lines: int = 40) -> None:
    for p in (paths.server_log, paths.out):
        t = tail(p, lines)
        if t.strip():
            print(f"----- last lines of {p} -----", file=sys.stderr)
            print(t, file=sys.stderr)
    sys.stderr.flush()


# ---------------------------------------------------------------- jars


def ensure_libs() -> Path:
    libs = libs_dir()
    marker = libs / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar"
    if marker.exists():
        return libs  # fast path: already fetched
    mvn = shutil.which("mvn")
    if not mvn:
        die(
            "no `mvn` found: Maven is needed once to fetch the Kafka jars from Maven Central "
            "(e.g. apt-get install maven)"
        )
    say(f"fetching kafka_{SCALA_VERSION} {KAFKA_VERSION} from Maven Central (first run only)...")
    t0 = time.monotonic()
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    pom = work / "pom.xml"
    pom.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- written by tally scripts/kafka: resolves the Kafka broker and its runtime deps -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.tally</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <!-- logging backend: kafka 3.9 logs through slf4j 1.7 to log4j 1.x (reload4j) -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>{SLF4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>ch.qos.reload4j</groupId>
      <artifactId>reload4j</artifactId>
      <version>{RELOAD4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
""")
    tmp = work / "libs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    mvn_log = work / "mvn.log"
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(pom),
        f"-Dmaven.repo.local={cache_root() / 'm2'}",
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
    ]
    with open(mvn_log, "w") as fh:
        rc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
        ).returncode
    if rc != 0 or not (tmp / marker.name).exists():
        print(tail(mvn_log, 40), file=sys.stderr)
        die(f"Maven could not fetch the Kafka jars (exit {rc}); full output in {mvn_log}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)  # atomic: a half-fetched dir is never taken for a complete one
    n = len(list(libs.glob("*.jar")))
    say(f"fetched {n} jars into {libs} in {time.monotonic() - t0:.1f}s")
    return libs


# ---------------------------------------------------------------- config


def load_state(paths: Paths) -> dict[str, Any]:
    try:
        state = json.loads(paths.state.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def new_cluster_id() -> str:
    while True:  # same rule as Kafka's Uuid.randomUuid: never starts with '-'
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def write_config(paths: Paths, port: int, controller_port: int) -> None:
    paths.props.write_text(f"""# written by tally scripts/kafka on every start; edit the script, not this file
process.roles=broker,controller
node.id={NODE_ID}
controller.quorum.voters={NODE_ID}@{HOST}:{controller_port}
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}
advertised.listeners=PLAINTEXT://{HOST}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={paths.logs}

# single node: every internal topic has one replica
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
default.replication.factor=1
min.insync.replicas=1
num.partitions=1
auto.create.topics.enable=true
delete.topic.enable=true
group.initial.rebalance.delay.ms=0

# small machine: modest buffers (the cleaner's default dedupe buffer is 128 MiB)
log.cleaner.dedupe.buffer.size=33554432
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
""")
    paths.log4j.write_text(f"""# written by tally scripts/kafka: quiet broker log in the data dir
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={paths.server_log}
log4j.appender.file.MaxFileSize=10MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
# startup/shutdown milestones only
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
log4j.logger.kafka.Kafka$=INFO
""")


def jvm_flags(paths: Paths) -> list[str]:
    heap = os.environ.get("TALLY_KAFKA_HEAP", "-Xms256m -Xmx512m").split()
    return [
        *heap,
        "-server",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{paths.log4j}",
        f"-Dkafka.logs.dir={paths.data}",
    ]


def format_storage(paths: Paths, libs: Path, cluster_id: str) -> None:
    cmd = [
        java_bin(),
        *jvm_flags(paths),
        "-cp",
        f"{libs}/*",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(paths.props),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        print_log_tails(paths)
        die(f"formatting the storage in {paths.logs} failed (exit {res.returncode})")


def formatted(paths: Paths) -> bool:
    return (paths.logs / "meta.properties").exists()


# ---------------------------------------------------------------- commands


def wait_ready(port: int, pid: int | None, timeout: float, paths: Paths) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(port, timeout=2.0)["ok"]:
            return True
        if pid is not None and not alive(pid):
            return False
        time.sleep(0.25)
    return False


def cmd_start(port: int, fresh: bool, timeout: float) -> int:
    paths = Paths(port)
    with port_lock(paths):
        return _start_locked(paths, port, fresh, timeout)


def _start_locked(paths: Paths, port: int, fresh: bool, timeout: float) -> int:
    t0 = time.monotonic()
    pid = our_pid(paths)
    p = probe(port)
    if p["ok"]:
        # tests/conftest.py relies on the word "reusing" here.
        if fresh:
            die(f"a broker answers on {HOST}:{port}: stop it before `start --fresh`")
        who = f"pid {pid}, started by scripts/kafka" if pid else "not started by scripts/kafka"
        say(f"reusing the broker already running on {HOST}:{port} ({who})")
        return 0
    if pid is not None and fresh:
        die(f"broker pid {pid} (ours) is running on port {port}: `{PROG} stop` first")
    if pid is not None:
        # Our JVM is alive but does not answer yet: an earlier start is still booting.
        say(f"broker pid {pid} is alive but not answering yet; waiting up to {timeout:.0f}s...")
        if wait_ready(port, pid, timeout, paths):
            say(f"started on {HOST}:{port} (pid {pid}) in {time.monotonic() - t0:.1f}s")
            return 0
        print_log_tails(paths)
        die(
            f"broker pid {pid} does not answer on {HOST}:{port}; see the logs above, "
            f"then `{PROG} stop --port {port}`"
        )
    if port_open(port):
        die(
            f"port {port} is in use by something that does not answer as a Kafka broker "
            f"({p['reason']}); pick another with --port or TALLY_KAFKA_PORT"
        )

    libs = ensure_libs()
    java = java_bin()
    if fresh and paths.data.exists():
        say(f"wiping {paths.data} (--fresh)")
        shutil.rmtree(paths.data)
    paths.data.mkdir(parents=True, exist_ok=True)
    state = load_state(paths) if formatted(paths) else {}

    controller_port = state.get("controller_port") or port + 1000
    if not 0 < controller_port < 65536 or port_open(controller_port):
        busy = controller_port
        controller_port = free_port()
        say(f"controller port {busy} is busy; using {controller_port}")
    write_config(paths, port, controller_port)

    if not formatted(paths):
        shutil.rmtree(paths.logs, ignore_errors=True)
        cluster_id = new_cluster_id()
        format_storage(paths, libs, cluster_id)
        state = {"cluster_id": cluster_id, "kafka_version": KAFKA_VERSION}
        say(f"formatted new cluster {cluster_id} in {paths.logs}")
    elif state.get("kafka_version") not in (None, KAFKA_VERSION):
        say(
            f"note: data dir was written by Kafka {state['kafka_version']}; "
            f"use `start --fresh` if this {KAFKA_VERSION} broker fails on it"
        )
    state["controller_port"] = controller_port
    state["port"] = port
    paths.state.write_text(json.dumps(state, indent=2) + "\n")

    with contextlib.suppress(OSError):
        paths.out.unlink()  # JVM stdout/stderr of this run only
    cmd = [java, *jvm_flags(paths), "-cp", f"{libs}/*", "kafka.Kafka", str(paths.props)]
    with open(paths.out, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=paths.data,
            start_new_session=True,
            close_fds=True,
        )
    paths.pid.write_text(f"{proc.pid}\n")

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(port, timeout=2.0)["ok"]:
            say(f"started on {HOST}:{port} (pid {proc.pid}) in {time.monotonic() - t0:.1f}s")
            return 0
        rc = proc.poll()
        if rc is not None:
            print_log_tails(paths)
            with contextlib.suppress(OSError):
                paths.pid.unlink()
            die(
                f"the broker exited with code {rc} before it answered; see the logs above "
                f"(a broken data dir can be reset with `{PROG} start --fresh --port {port}`)"
            )
        time.sleep(0.25)
    print_log_tails(paths)
    _terminate(proc.pid, STOP_TIMEOUT)
    with contextlib.suppress(OSError):
        paths.pid.unlink()
    die(
        f"the broker did not answer on {HOST}:{port} within {timeout:.0f}s; stopped it. "
        f"Logs: {paths.server_log}, {paths.out}"
    )


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM, wait, SIGKILL. True if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return False
        time.sleep(0.1)
    say(f"pid {pid} did not exit within {timeout:.0f}s; sending SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def cmd_stop(port: int, timeout: float) -> int:
    paths = Paths(port)
    with port_lock(paths):
        return _stop_locked(paths, port, timeout)


def _stop_locked(paths: Paths, port: int, timeout: float) -> int:
    pid = our_pid(paths)
    if pid is None:
        with contextlib.suppress(OSError):
            paths.pid.unlink()
        if probe(port)["ok"]:
            say(
                f"the broker on {HOST}:{port} was not started by scripts/kafka "
                f"(no live pid in {paths.pid}); leaving it alone"
            )
            return 1
        say(f"not running on {HOST}:{port}")
        return 0
    t0 = time.monotonic()
    killed = _terminate(pid, timeout)
    with contextlib.suppress(OSError):
        paths.pid.unlink()
    how = "killed" if killed else "stopped"
    say(f"{how} broker pid {pid} on {HOST}:{port} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_restart(port: int, timeout: float) -> int:
    paths = Paths(port)
    with port_lock(paths):
        if our_pid(paths) is None and probe(port)["ok"]:
            die(f"the broker on {HOST}:{port} was not started by scripts/kafka; cannot restart it")
        rc = _stop_locked(paths, port, STOP_TIMEOUT)
        if rc != 0:
            return rc
        return _start_locked(paths, port, fresh=False, timeout=timeout)


def cmd_status(port: int) -> int:
    paths = Paths(port)
    p = probe(port)
    pid = our_pid(paths)
    if p["ok"]:
        who = f"pid {pid}, data {paths.data}" if pid else "not started by scripts/kafka"
        say(f"running on {HOST}:{port} ({who})")
        return 0
    if pid:
        say(
            f"not answering on {HOST}:{port}, but broker pid {pid} is alive "
            f"(starting, or stuck: see `{PROG} logs`) — {p['reason']}"
        )
    else:
        say(f"not running on {HOST}:{port}")
    return 1


def cmd_logs(port: int, lines: int) -> int:
    paths = Paths(port)
    for p in (paths.server_log, paths.out):
        print(f"----- {p} -----")
        print(tail(p, lines) or "(empty or missing)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"broker port on {HOST} (default $TALLY_KAFKA_PORT or {DEFAULT_PORT})",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--port",
        type=int,
        default=argparse.SUPPRESS,
        help=f"broker port on {HOST} (default $TALLY_KAFKA_PORT or {DEFAULT_PORT})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_start = sub.add_parser("start", parents=[common], help="start (or reuse) the broker")
    p_start.add_argument(
        "--fresh", action="store_true", help="wipe the data dir first: new cluster, no topics"
    )
    p_start.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT,
        help=f"seconds to wait until it answers (default {START_TIMEOUT:.0f})",
    )
    p_stop = sub.add_parser("stop", parents=[common], help="stop the broker this script started")
    p_stop.add_argument(
        "--timeout",
        type=float,
        default=STOP_TIMEOUT,
        help=f"seconds before SIGKILL (default {STOP_TIMEOUT:.0f})",
    )
    p_restart = sub.add_parser(
        "restart", parents=[common], help="stop then start, keeping the data (topics survive)"
    )
    p_restart.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT,
        help=f"seconds to wait until it answers (default {START_TIMEOUT:.0f})",
    )
    sub.add_parser("status", parents=[common], help="exit 0 if a broker answers, else 1")
    p_logs = sub.add_parser("logs", parents=[common], help="print the tail of the broker logs")
    p_logs.add_argument("-n", "--lines", type=int, default=50)
    args = parser.parse_args(argv)

    port = args.port or int(os.environ.get("TALLY_KAFKA_PORT") or DEFAULT_PORT)
    if not 0 < port < 65536:
        die(f"bad port {port}")
    if args.command == "start":
        return cmd_start(port, args.fresh, args.timeout)
    if args.command == "stop":
        return cmd_stop(port, args.timeout)
    if args.command == "restart":
        return cmd_restart(port, args.timeout)
    if args.command == "status":
        return cmd_status(port)
    return cmd_logs(port, args.lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
