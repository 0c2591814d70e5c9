"""``make deploy-local``: Flower's distributed runtime on 127.0.0.1, as a coordinator and hospitals run it.

Real processes, no containers: a throwaway CA and certificates, one key pair per
hospital, an MLflow tracking server on PostgreSQL (SQLite only where nothing
listens on PostgreSQL's address), a SuperLink with TLS and SuperNode authentication, every
site's public key registered, one SuperNode per site reading only its own
``data-dir``, then ``flwr run``. Every process started here is stopped on the
way out, also on failure or Ctrl-C. The flags are the ones in ``compose/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from client.credentials import make_node_key
from server import runner
from server.credentials import make_tls

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
FEDHOSP_ROOT = Path(__file__).resolve().parent.parent  # the fedhosp a launcher imports (client/launcher.py)
logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlink_command(certs: Path, port: int, database: Path, insecure: bool = False) -> list[str]:
    """The coordinator's SuperLink: TLS and node authentication unless ``insecure`` (development only)."""
    tls = ["--insecure"] if insecure else [
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]
    return ["flower-superlink", *tls, "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(database)]


def supernode_command(ca: Path | None, superlink: str, key: Path | None, node_config: str, port: int,
                      superexec_secret: Path | None = None) -> list[str]:
    """A hospital's SuperNode: trusts the coordinator's CA and signs with its own registered key.

    With ``superexec_secret`` it runs no app code itself (``--isolation process``): the launcher beside it, which
    authenticates with that secret, starts every ClientApp (:func:`launcher_command`)."""
    auth = ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        auth += ["--auth-supernode-private-key", str(key)]
    isolated = ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)] \
        if superexec_secret else []
    return ["flower-supernode", *auth, "--superlink", superlink, "--node-config", node_config, *isolated,
            "--host", "127.0.0.1", "--port", str(port)]


def launcher_command(runtime_api: str, superexec_secret: Path) -> list[str]:
    """The hospital's launcher beside its SuperNode: checks every app's full FAB hash against the site policy
    before any of the app's code runs (client/launcher.py); plain HTTP to the SuperNode on the same host."""
    return [sys.executable, "-m", "client.launcher", "--runtime-api-address", runtime_api, "--insecure",
            "--superexec-auth-secret-file", str(superexec_secret)]


def superexec_secret(folder: Path) -> Path:
    """The secret a SuperNode and its launcher share (mode 0600), made once."""
    path = Path(folder) / "superexec_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_hex(32).encode())
    return path


def database_name(workdir: Path) -> str:
    """One PostgreSQL database per deployment folder: two deployments never share a store (nor do tests)."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:10]
    return f"fedhosp_{workdir.name.replace('-', '_')}"[:48].lower() + f"_{digest}"


def drop_database(backend: str) -> None:
    """Remove a deployment's PostgreSQL database (tests clean up after themselves); SQLite stores are files."""
    if not backend.startswith("postgresql"):
        return
    import psycopg2
    from psycopg2 import sql

    server, database = backend.replace("+psycopg2", "", 1).rsplit("/", 1)
    conn = psycopg2.connect(f"{server}/postgres", connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    finally:
        conn.close()


def listening(server: str, timeout: float = 3.0) -> bool:
    """Whether anything accepts a TCP connection at ``server``'s (a PostgreSQL URL's) host and port."""
    parts = urlsplit(server)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, no answer
        return False


def mlflow_backend(workdir: Path, database: str = "fedhosp_mlflow", server: str = POSTGRES) -> str:
    """The PostgreSQL at ``server`` with a database of our own; SQLite only where nothing listens there.

    Only an unreachable server falls back (and says so); a PostgreSQL that answers and refuses (its
    authentication, a permission) is an error to fix, not a reason to track somewhere else.
    """
    if not listening(server):
        store = workdir / "mlflow.db"
        logger.warning("no PostgreSQL listens at %s; MLflow tracks to SQLite (%s)", urlsplit(server).netloc, store)
        return f"sqlite:///{store}"
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(f"{server}/postgres", connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        conn.close()
    return f"{server.replace('postgresql://', 'postgresql+psycopg2://', 1)}/{database}"


@dataclass
class Processes:
    """Every process this deployment started, stopped together (with everything below them)."""

    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """``command`` in a session of its own, its output appended to ``log`` (the process holds the only
        handle on it: this one is closed as soon as the process has its copy)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def stop(self) -> None:
        """All at once (each SuperNode and the SuperLink take seconds to shut down gracefully), newest first."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.started))) as pool:
            list(pool.map(lambda entry: runner.stop_process_tree(entry[1], grace=5.0), reversed(self.started)))
        self.started.clear()


def write_connection(flwr_home: Path, name: str, port: int, ca: Path) -> str:
    """``$FLWR_HOME/config.toml`` with one connection, the default: the deployment's SuperLink over TLS."""
    runner.write_toml(flwr_home / "config.toml", {"superlink": {
        "default": name, name: {"address": f"127.0.0.1:{port}", "root-certificates": str(ca)}}})
    return name


@dataclass
class Deployment:
    workdir: Path
    sites: list[str]
    superlink_port: int
    mlflow_uri: str
    backend: str
    env: dict[str, str]
    connection: str
    processes: Processes
    certs: Path


def site_env(base: dict[str, str], home: Path) -> dict[str, str]:
    env = dict(base)
    env["FEDHOSP_HOME"] = str(home)
    env["FLWR_HOME"] = str(home / "flwr")
    return env


@contextmanager
def deploy_local(workdir: Path, sites: list[str], site_dirs: dict[str, Path], policies: dict[str, Path] | None = None,
                 register: list[str] | None = None, mlflow_server: bool = True, launched: list[str] | None = None):
    """Coordinator (MLflow server, SuperLink) plus one SuperNode per site; everything stopped on exit.

    ``register`` lists the sites whose keys the coordinator registers (default: all), so a test
    can start a node the coordinator does not know. ``mlflow_server=False`` tracks to a SQLite file
    instead (a test about the nodes, not the tracking server). ``launched`` lists the sites whose
    SuperNode runs under ``--isolation process`` with fedhosp's launcher beside it (default: every site, as
    compose/site.yml runs a hospital's node); the others run Flower's own ``flwr-clientapp`` per message.
    """
    workdir = Path(workdir)
    base = runner.runtime_env()
    processes = Processes()
    with ExitStack() as stack:
        stack.callback(processes.stop)
        certs = workdir / "certs"
        make_tls(certs)
        # --- coordinator: MLflow server beside it, then the SuperLink -------------------------
        coordinator = site_env(base, workdir / "coordinator")
        mlflow_port = free_port()
        if mlflow_server:
            backend = mlflow_backend(workdir, database=database_name(workdir))
            log = workdir / "logs" / "mlflow.log"
            proc = processes.start("mlflow", [
                "mlflow", "server", "--backend-store-uri", backend,
                "--artifacts-destination", str(workdir / "mlartifacts"),
                "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], coordinator, log)
        else:
            backend = f"sqlite:///{workdir / 'mlflow.db'}"
        port = free_port()
        (workdir / "superlink").mkdir(parents=True, exist_ok=True)
        log_sl = workdir / "logs" / "superlink.log"
        sl = processes.start("superlink", superlink_command(certs, port, workdir / "superlink" / "state.db"),
                             coordinator, log_sl)
        runner.wait_until(lambda: runner.http_ok(f"https://127.0.0.1:{port}/health", certs / "ca.crt"), "SuperLink",
                          60, sl, log_sl)
        connection = write_connection(Path(coordinator["FLWR_HOME"]), f"deploy-{port}", port, certs / "ca.crt")
        # --- hospitals: each makes a key pair and hands the coordinator only the public key ----
        for site in sites:
            key, pub = make_node_key(workdir / "sites" / site / "keys", "node_key")
            if register is None or site in register:
                out = subprocess.run(["flwr", "supernode", "register", str(pub), connection, "--name", site],
                                     env=coordinator, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"registering {site} failed: {out.stdout[-500:]}{out.stderr[-500:]}")
        for site in sites:
            home = workdir / "sites" / site
            config = {"site-name": site, "data-dir": str(site_dirs[site]), "ledger-dir": str(home / "ledger")}
            if policies and site in policies:
                config["policy"] = str(policies[site])
            secret = superexec_secret(home / "keys") if launched is None or site in launched else None
            runtime_port = free_port()
            processes.start(f"supernode-{site}", supernode_command(
                certs / "ca.crt", f"127.0.0.1:{port}", home / "keys" / "node_key", runner.config_arg(config),
                runtime_port, secret),
                site_env(base, home), workdir / "logs" / f"supernode-{site}.log")
            if secret:  # the launcher imports this fedhosp, whatever the working directory
                env = {**site_env(base, home), "PYTHONPATH": os.pathsep.join(
                    p for p in (str(FEDHOSP_ROOT), base.get("PYTHONPATH", "")) if p)}
                processes.start(f"launcher-{site}", launcher_command(f"127.0.0.1:{runtime_port}", secret), env,
                                workdir / "logs" / f"launcher-{site}.log")
        if mlflow_server:
            runner.wait_until(lambda: runner.http_ok(f"http://127.0.0.1:{mlflow_port}/health"), "MLflow server", 120,
                              proc, log)
        yield Deployment(workdir, sites, port, f"http://127.0.0.1:{mlflow_port}" if mlflow_server else backend,
                         backend, coordinator, connection, processes, certs)


def run_on(deployment: Deployment, app_dir: Path, run_config: dict, echo=None,
           timeout: float | None = 1800) -> runner.RunOutcome:
    """``flwr run`` against the deployment's SuperLink, waiting for the run's real status."""
    config = {"mlflow-uri": deployment.mlflow_uri, "min-nodes": len(deployment.sites), **run_config}
    command = ["flwr", "run", str(app_dir), deployment.connection, "--stream",
               "--run-config", runner.config_arg(config)]
    return runner.submit(command, deployment.env, deployment.connection, app_dir, echo, timeout)
