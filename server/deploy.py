"""``make deploy-local``: Flower's distributed runtime on 127.0.0.1, as a coordinator and hospitals run it.

Real processes, no containers: a throwaway CA and certificates, one key pair per
hospital, an MLflow tracking server on PostgreSQL (SQLite only where no
PostgreSQL answers), a SuperLink with TLS and SuperNode authentication, every
site's public key registered, one SuperNode per site reading only its own
``data-dir``, then ``flwr run``. Every process started here is stopped on the
way out, also on failure or Ctrl-C. The flags are the ones in ``compose/``.
"""

from __future__ import annotations

import hashlib

import socket
import ssl
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from server import runner
from server.credentials import make_node_key, make_tls

POSTGRES = "postgresql://postgres@127.0.0.1:5432"


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


def supernode_command(ca: Path | None, superlink: str, key: Path | None, node_config: str, port: int) -> list[str]:
    """A hospital's SuperNode: trusts the coordinator's CA and signs with its own registered key."""
    auth = ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        auth += ["--auth-supernode-private-key", str(key)]
    return ["flower-supernode", *auth, "--superlink", superlink, "--node-config", node_config,
            "--host", "127.0.0.1", "--port", str(port)]


def database_name(workdir: Path) -> str:
    """One PostgreSQL database per deployment folder: two deployments never share a store (nor do tests)."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:10]
    return f"fedhosp_{workdir.name.replace('-', '_')}"[:48].lower() + f"_{digest}"


def drop_database(backend: str) -> None:
    """Remove a deployment's PostgreSQL database (tests clean up after themselves); SQLite stores are files."""
    if not backend.startswith("postgresql"):
        return
    import psycopg2

    database = backend.rsplit("/", 1)[1]
    conn = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    conn.close()


def mlflow_backend(workdir: Path, database: str = "fedhosp_mlflow") -> str:
    """The PostgreSQL on 127.0.0.1:5432 with a database of our own; SQLite where none answers."""
    try:
        import psycopg2

        conn = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=3)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    except Exception as exc:  # no server, no driver, no permission
        print(f"PostgreSQL not available ({type(exc).__name__}); MLflow falls back to SQLite")
        return f"sqlite:///{workdir / 'mlflow.db'}"


@dataclass
class Processes:
    """Every process this deployment started, stopped together (with their descendants)."""

    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(command, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started.append((name, proc))
        return proc

    def stop(self) -> None:
        """All at once (each SuperNode and the SuperLink take seconds to shut down gracefully), newest first."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.started))) as pool:
            list(pool.map(lambda entry: runner.stop_process_group(entry[1], grace=5.0), reversed(self.started)))
        self.started.clear()


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}" + (f"; see {log}" if log else ""))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f}s" + (f"; see {log}" if log else ""))
        time.sleep(0.3)


def _https_ok(url: str, ca: Path) -> bool:
    try:
        with urlopen(url, timeout=1, context=ssl.create_default_context(cafile=str(ca))) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urlopen(url, timeout=1) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


def write_connection(flwr_home: Path, name: str, port: int, ca: Path) -> str:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n', encoding="utf-8")
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
                 register: list[str] | None = None, mlflow_server: bool = True):
    """Coordinator (MLflow server, SuperLink) plus one SuperNode per site; everything stopped on exit.

    ``register`` lists the sites whose keys the coordinator registers (default: all), so a test
    can start a node the coordinator does not know. ``mlflow_server=False`` tracks to a SQLite file
    instead (a test about the nodes, not the tracking server).
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
        wait_until(lambda: _https_ok(f"https://127.0.0.1:{port}/health", certs / "ca.crt"), "SuperLink", 60, sl, log_sl)
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
            config = f"site-name='{site}' data-dir='{site_dirs[site]}' ledger-dir='{home / 'ledger'}'"
            if policies and site in policies:
                config += f" policy='{policies[site]}'"
            processes.start(f"supernode-{site}", supernode_command(
                certs / "ca.crt", f"127.0.0.1:{port}", home / "keys" / "node_key", config, free_port()),
                site_env(base, home), workdir / "logs" / f"supernode-{site}.log")
        if mlflow_server:
            wait_until(lambda: _http_ok(f"http://127.0.0.1:{mlflow_port}/health"), "MLflow server", 120, proc, log)
        yield Deployment(workdir, sites, port, f"http://127.0.0.1:{mlflow_port}" if mlflow_server else backend,
                         backend, coordinator, connection, processes, certs)


def run_on(deployment: Deployment, app_dir: Path, run_config: dict, echo=None, timeout: float = 1800) -> runner.RunOutcome:
    """``flwr run`` against the deployment's SuperLink, waiting for the run's real status."""
    config = {"mlflow-uri": deployment.mlflow_uri, "min-nodes": len(deployment.sites), **run_config}
    command = ["flwr", "run", str(app_dir), deployment.connection, "--stream",
               "--run-config", runner.config_arg(config)]
    return runner.submit(command, deployment.env, deployment.connection, app_dir, echo, timeout)
