"""The hospital's launcher: only the apps its policy pins run on its node, checked before any of their code is.

An app cannot be trusted to check itself (a changed app skips the check), so the check runs outside it. A
SuperNode started with ``--isolation process`` runs no app code: a SuperExec beside it takes each pending task
and starts a process for it. This launcher *is* that SuperExec: Flower's own (``flower-superexec``'s flags,
loop and plugin), except that for a ClientApp task it starts this module's ``task`` mode instead of
``flwr-clientapp``. The task process pulls the task's inputs (message, context, run, FAB) over the SuperNode's
Runtime API with Flower's own code, computes the SHA-256 of the FAB's bytes itself, compares it with the hash
the FAB came under and with the site policy's ``allowed-app-hashes`` (node config ``policy``), and then

- allowed: goes on, in the same process, as Flower's ``flwr-clientapp`` does (``run_clientapp``: install the
  FAB, import its ClientApp, handle the message, push the reply), with ``FEDHOSP_VERIFIED_APP`` set;
- refused: the FAB is neither installed nor imported; the process replies with the refusal the node's error
  boundary sends (a ``"refusal"`` record: site, rule ``allowed-app-hashes``, reason naming the site and the
  hash; client/mods.py), records it in the site's ledger, and finishes the task.

It trusts the hospital's installed fedhosp (this module, client/policy.py, client/mods.py) and Flower; run as
``python -m client.launcher`` or ``fedhosp site launcher`` with ``flower-superexec``'s flags.

A fresh ``flwr-clientapp`` process spends about 3 of its 4 seconds here importing Flower's runtime and torch,
for every message. The launcher's task processes come from a fork server (:mod:`multiprocessing`'s
``forkserver``) that imported those once (:data:`WARM_MODULES`: Flower, torch, NumPy and pandas, no app
code), so a message pays for its own work only. Each task is still a process of its own, started from that
clean, single-threaded server, and imports the app from its FAB after the check, as before.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import multiprocessing
import os
import sys
from multiprocessing import forkserver
from pathlib import Path

from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.plugin import AutoExecPlugin

from client.policy import VERIFIED_APP_ENV, SitePolicy
from client.site import Site, resolve_site
from models.errors import PolicyRefusal, SiteDataError

log = logging.getLogger(__name__)

TASK = "task"  # the per-task mode: ``python -m client.launcher task <flwr-clientapp's flags>``
# The installed fedhosp's top-level packages (pyproject): forgotten before an allowed app is imported, so that its
# own packages of the same names come from the folder Flower installs the FAB in.
FEDHOSP_PACKAGES = ("client", "models", "server")
# Imported once by the fork server the task processes start from: what every task imports before the app's code.
# (Not this module: a task process runs it afresh as multiprocessing's main module, which it is in the launcher.)
WARM_MODULES = ("flwr.supernode.runtime.run_clientapp", "flwr.supercore.runtime", "flwr.app", "torch", "numpy",
                "pandas")


class CheckingExecutor(SubprocessExecutor):
    """Flower's subprocess executor, starting this module's task mode (which checks the FAB) for every task, as a
    process forked from a warm fork server (:data:`WARM_MODULES`) rather than a fresh interpreter."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[multiprocessing.process.BaseProcess] = []
        self.tasks = multiprocessing.get_context("forkserver")
        self.tasks.set_forkserver_preload(list(WARM_MODULES))
        forkserver.ensure_running()  # it imports them now, while the node waits for its first message

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fedhosp's launcher runs ClientApps only, not {spec.task_type}")
        self.running = [proc for proc in self.running if proc.is_alive()]  # reaps the ended ones
        # by its module's name: run as ``python -m client.launcher``, this module is __main__, which the fork
        # server's children do not have
        entry = importlib.import_module("client.launcher").main
        task = self.tasks.Process(target=entry, args=(task_command(spec)[3:],), name="fedhosp-task")
        task.start()
        self.running.append(task)
        return LaunchResult.accepted()


class CheckingPlugin(AutoExecPlugin):
    """Flower's SuperExec plugin, for ClientApp tasks only, launching through :class:`CheckingExecutor`."""

    supported_task_types = frozenset({TaskType.CLIENT_APP})

    def __init__(self, *args, executor, **kwargs) -> None:
        del executor  # Flower's SubprocessExecutor would start flwr-clientapp unchecked
        super().__init__(*args, executor=CheckingExecutor(), **kwargs)


def task_command(spec: ExecutionSpec) -> list[str]:
    """The task process for ``spec``: ``flwr-clientapp``'s flags, this module in its place (the launcher hands the
    arguments after ``-m client.launcher`` to a forked task process; the command itself runs one task alike)."""
    command = [sys.executable, "-m", "client.launcher", TASK, "--runtime-api-address", spec.runtime_api_address,
               "--token", spec.token]
    if spec.insecure:
        command.append("--insecure")
    elif spec.root_certificates_path is not None:
        command += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        command += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        command.append("--allow-runtime-dependency-installation")
    return command


def run_launcher(argv: list[str]) -> None:
    """Flower's ``flower-superexec`` with :class:`CheckingPlugin` as its plugin (its one construction site)."""
    if any(arg.startswith("--executor") for arg in argv):
        raise SystemExit("fedhosp's launcher starts each ClientApp as a local process; --executor is not supported")
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
    if loop.AutoExecPlugin is not AutoExecPlugin and loop.AutoExecPlugin is not CheckingPlugin:
        raise RuntimeError("this Flower's SuperExec no longer builds its plugin as AutoExecPlugin; "
                           "fedhosp's launcher cannot hook in")
    loop.AutoExecPlugin = CheckingPlugin
    sys.argv = ["fedhosp-launcher", *argv]
    cli.flower_superexec()


def fab_refusal(site: str, policy: SitePolicy, content: bytes, declared: str) -> tuple[str, PolicyRefusal | None]:
    """The FAB's SHA-256, computed here, and why the policy refuses it (None: allowed)."""
    actual = hashlib.sha256(content).hexdigest()
    if actual != declared.lower():
        return actual, PolicyRefusal(f"site {site}: policy refuses app {actual}: its content does not match the hash "
                                     f"it was sent under ({declared})", rule="allowed-app-hashes")
    try:
        policy.check_app(site, actual)
    except PolicyRefusal as refusal:
        return actual, refusal
    return actual, None


def app_hash(path: Path) -> str:
    """The full FAB hash a hospital pins: of a ``.fab`` file's bytes, or of the FAB that ``flwr run`` builds from an
    app folder (Flower's own build: fixed zip timestamps, sorted files, so the same files give the same bytes)."""
    from flwr.cli.build import build_fab_from_disk

    path = Path(path)
    content = path.read_bytes() if path.is_file() else build_fab_from_disk(path)
    return hashlib.sha256(content).hexdigest()


def site_of(node_config: dict) -> Site:
    """This node's site, as the ClientApp resolves it (client/site.py); "unknown" if the config names none."""
    def no_demo(*_):  # a deployed node has a data-dir; only a simulation falls back to demo data
        raise SiteDataError("no site")

    try:
        return resolve_site(node_config, "", no_demo)
    except SiteDataError:
        return Site("unknown", Path())


def check_task(fab, context) -> tuple[str, str, PolicyRefusal | None]:
    """(site, the FAB's hash, the refusal or None) for a task's pulled FAB and the node's context."""
    node_config = dict(context.node_config)
    site = site_of(node_config).name
    try:
        policy = SitePolicy.load(node_config.get("policy"), site)
    except PolicyRefusal as refusal:
        return site, hashlib.sha256(fab.content).hexdigest(), refusal
    return (site, *fab_refusal(site, policy, fab.content, fab.hash_str))


def refuse(client, message, context, site: str, fab_hash: str, refusal: PolicyRefusal) -> None:
    """Reply with the structured refusal, record it in the site's ledger, and finish the task; no app code runs."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime import run_clientapp as flower

    from client.mods import Visit, refusal_reply, site_ledger

    flower.push_message(client, refusal_reply(message, site, refusal), context)
    current = Visit(message, context, dict(context.run_config), None, site_of(dict(context.node_config)))
    try:
        config = dict(current.config)
        site_ledger(current).append(f"{current.kind}-failed", {
            "run_id": context.run_id, "site": site, "round": config.get("server-round"),
            "received": {"config": config}, "app": {"fab_hash": fab_hash}, "reason": str(refusal),
            "refused": refusal.rule})
    except Exception as exc:  # the refusal has left already; the ledger's failure is the node's to see
        log.error("fedhosp launcher: the site ledger could not record the refusal (%s)", type(exc).__name__)
    flower.push_task_output(client, context, SubStatus.COMPLETED, "")


def forget_fedhosp_modules() -> None:
    """Drop what this process imported from the installed fedhosp, so that the app's packages of the same names
    are imported from its FAB's install folder (Flower puts that first on ``sys.path``), not resolved to ours."""
    for name in [n for n in sys.modules if n.split(".")[0] in FEDHOSP_PACKAGES]:
        del sys.modules[name]


def run_task(argv: list[str]) -> None:
    """One ClientApp task: pull its inputs, check the FAB, then refuse or hand over to Flower's ``run_clientapp``."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as flower

    parser = argparse.ArgumentParser(description="fedhosp's checked ClientApp task (flwr-clientapp's flags)")
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args(argv)
    token = try_obtain_flwr_app_token(args)
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    try:
        pulled = flower.pull_task_input(client)  # message, context, run, fab: the task is now running
        message, context, _, fab = pulled
        site, fab_hash, refusal = check_task(fab, context)
        if refusal is not None:
            log.warning("fedhosp launcher: %s", refusal)
            refuse(client, message, context, site, fab_hash, refusal)
            return
    finally:
        client.close()
    os.environ[VERIFIED_APP_ENV] = fab_hash
    forget_fedhosp_modules()
    flower.pull_task_input = lambda _client: pulled  # the inputs were pulled once, here; Flower's code does the rest
    flower.run_clientapp(runtime_api_address=args.runtime_api_address, token=token, insecure=args.insecure,
                         certificates=certificates, parent_pid=args.parent_pid,
                         runtime_dependency_install=args.runtime_dependency_install)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [TASK]:
        run_task(argv[1:])
    else:
        run_launcher(argv)


if __name__ == "__main__":
    main()
