"""``fedhosp site``: the hospital's commands. ``check DIR`` shows what a node would use from its site folder,
before it joins a federation; ``node-key DIR`` makes the node's key pair; ``budget`` shows its privacy budget;
``app-hash APP`` prints the FAB hash its policy pins; ``launcher`` runs its ClientApps, checked (client/launcher.py).

The check runs on the node and prints locally: hospital IT sees how many images or
patients are usable, what was skipped and why, the class balance and a data
fingerprint (a SHA-256 over the data's content, never names or identifiers) to
tell later whether the data changed. A radiology check fills the node's image
cache, so the first round does not decode again; for a PACS site (client/data/pacs.py)
it first retrieves the new instances into that cache and says how many it found,
retrieved, already held and could not retrieve.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.data.tabular import COHORT_FILE, RESERVED, cohort_fingerprint, identifier_like, load_cohort, read_cohort
from models.errors import SiteDataError
from client.policy import SitePolicy

site_app = typer.Typer(no_args_is_help=True)


class Task(str, Enum):
    radiology = "radiology"
    oncology = "oncology"


@site_app.callback()
def _group() -> None:
    """A hospital's commands: check its site folder, make its node key, read its privacy budget, pin apps by hash,
    run its checked ClientApps."""


@site_app.command()
def check(
    folder: Annotated[Path, typer.Argument(help="The site's data folder.")],
    task: Annotated[Task | None, typer.Option(
        help=f"radiology (DICOM + labels.csv) or oncology ({COHORT_FILE}); "
             f"default: oncology when the folder holds {COHORT_FILE}.")] = None,
    site: Annotated[str | None, typer.Option(help="The site's name; default: the folder's name.")] = None,
    image_size: Annotated[int, typer.Option(min=8, help="Radiology: the model's image side, in pixels.")] = 64,
    features: Annotated[str, typer.Option(help="Oncology: the run's declared feature columns (comma-separated), "
                                               "as run-config features; empty = every numeric column.")] = "",
    policy: Annotated[Path | None, typer.Option(help="The node's policy file (its min-examples is checked).")] = None,
    pacs: Annotated[str, typer.Option(help="Radiology from a PACS: node config pacs (a DICOMweb URL or AET@host:port; "
                                           "default: url in the folder's pacs.toml, which holds the query).")] = "",
    pacs_credentials: Annotated[Path | None, typer.Option(help="Node config pacs-credentials: a file holding "
                                                               "user:password or a bearer token.")] = None,
    pacs_aet: Annotated[str, typer.Option(help="Node config pacs-aet: our AE title for a DIMSE PACS.")] = "",
    cache_dir: Annotated[Path | None, typer.Option(help="Node config cache-dir (default: "
                                                        "$FEDHOSP_HOME/cache/radiology).")] = None,
) -> None:
    """Print usable and skipped data, class balance and the data fingerprint; for a PACS site (pacs.toml in the
    folder, or --pacs) first the instances found, retrieved now, already cached and not retrieved.

    Exit 1 if nothing is usable, or if the node would refuse to join: identifier-like columns that no declared
    ``features`` list covers, or fewer patients or images than the policy's minimum; or if the PACS cannot be read.
    """
    console = Console()
    name = site or folder.resolve().name
    if task is None:
        task = Task.oncology if (folder / COHORT_FILE).is_file() else Task.radiology
    try:
        minimum = SitePolicy.load(policy, name).min_examples
        declared = [c.strip() for c in features.split(",") if c.strip()]
        node_config = {k: str(v) for k, v in {"pacs": pacs, "pacs-credentials": pacs_credentials,
                                               "pacs-aet": pacs_aet}.items() if v}
        usable = _oncology(console, folder, name, declared, minimum) if task is Task.oncology else _radiology(
            console, folder, name, image_size, minimum, node_config, cache_dir)
    except SiteDataError as exc:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise typer.Exit(1) from None
    if not usable:
        raise typer.Exit(1)


@site_app.command()
def budget(
    site: Annotated[str | None, typer.Option(help="The site's name: its ledger folder is "
                                                  "$FEDHOSP_HOME/site-ledgers/<site> unless --ledger-dir is given.")] = None,
    ledger_dir: Annotated[Path | None, typer.Option(help="The node's ledger-dir (node config).")] = None,
    policy: Annotated[Path | None, typer.Option(help="The node's policy file (its max-epsilon and delta).")] = None,
    delta: Annotated[float, typer.Option(help="The delta to count at when the policy sets none.")] = 1e-5,
) -> None:
    """Print what each data set's privacy budget has spent and has left (dp training, client/privacy.py)."""
    from client.privacy import budgets
    from models.home import fedhosp_home

    if ledger_dir is None and site is None:
        raise typer.BadParameter("give --site or --ledger-dir")
    folder = ledger_dir or fedhosp_home() / "site-ledgers" / str(site)
    name = site or folder.name
    console = Console()
    try:
        rules = SitePolicy.load(policy, name)
        found = budgets(folder)
        delta = rules.privacy_delta(delta)
        table = _table(f"site {name}: privacy budget at δ = {delta:g} (Opacus RDP accountant)", "data set",
                       "runs", "rounds", "last used", "ε spent", "max-epsilon", "ε left")
        total, maximum = 0.0, rules.max_epsilon
        for store in found:
            entries = store.entries()
            spent = store.spent(delta)
            total += spent
            table.add_row(store.fingerprint[:12], str(len({e["run"] for e in entries})), str(len(entries)),
                          entries[-1]["time"][:16] if entries else "–", f"{spent:.3f}",
                          f"{maximum:g}" if maximum else "none", f"{max(maximum - spent, 0.0):.3f}" if maximum else "–")
    except SiteDataError as exc:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise typer.Exit(1) from None
    console.print(table)
    if not found:
        console.print(f"no dp training has used data at this site yet ({folder})")
    elif len(found) > 1:  # a patient in every export is bounded by the sum (basic composition)
        console.print(f"all data sets together: ε ≤ {total:.3f} at δ ≤ {delta * len(found):g} for a patient "
                      "present in every one of them")


@site_app.command("app-hash")
def app_hash(
    app: Annotated[Path, typer.Argument(exists=True, help="The app folder the coordinator runs (as `flwr run "
                                                          "<folder>` uploads it), or a built .fab file.")],
) -> None:
    """Print the app's full FAB hash (SHA-256), as allowed-app-hashes pins it."""
    from client.launcher import app_hash as fab_hash

    Console().out(fab_hash(app), highlight=False)


@site_app.command("launcher", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                "help_option_names": []})
def launcher(ctx: typer.Context) -> None:
    """Run the node's ClientApps, each only after its FAB hash passed the policy (flower-superexec's flags; beside
    a SuperNode started with --isolation process)."""
    from client.launcher import main

    main(ctx.args)


@site_app.command("node-key")
def node_key(
    folder: Annotated[Path, typer.Argument(help="Where to write node_key (private, 0600) and node_key.pub.")],
) -> None:
    """The node's SuperNode key pair (EC P-384, OpenSSH): keep node_key, send node_key.pub to the coordinator."""
    from client.credentials import make_node_key

    private, public = make_node_key(folder, "node_key")
    Console().out(f"private key (keep on the node): {private}\npublic key (send to the coordinator): {public}",
                  highlight=False)


def _problem(console: Console, text: str) -> None:
    console.print(Text.assemble(("problem: ", "bold red"), text))


def _radiology(console: Console, folder: Path, name: str, image_size: int, minimum: int, node_config: dict,
               cache_dir: Path | None) -> int:
    from client.data import dicom, pacs  # pydicom and torch only when a radiology folder is checked

    source = pacs.pacs_source(folder, name, node_config)
    images = None
    if source is not None:  # a PACS site: its instances into the node's cache first, then as a folder
        synced = pacs.sync(source, pacs.cache_folder(cache_dir))
        images = synced.folder
        table = _table(f"site {name}: PACS {synced.pacs}", "", "")
        table.add_row("instances found", str(synced.found))
        table.add_row("retrieved now", str(synced.retrieved))
        table.add_row("already cached", str(synced.cached))
        table.add_row("not retrieved (gone, or a SOP class not offered)", str(synced.not_retrieved))
        table.add_row("removed (no longer found)", str(synced.removed))
        rate = f" ({synced.retrieved / synced.retrieval_seconds:.0f} instances/s)" if synced.retrieved else ""
        table.add_row("sync time", f"{synced.seconds:.1f} s{rate}")
        console.print(table)
    report = dicom.site_report(folder, name, image_size, cache_dir, images)
    summary = _table(f"site {name}: radiology", "", "")
    summary.add_row("usable images", str(report["usable"]))
    summary.add_row("patients", str(report["patients"]))
    summary.add_row(f"{dicom.LABELS_FILE} rows without an image", str(report["unmatched_labels"]))
    summary.add_row("images decoded now (not cached)", str(report["decoded"]))
    console.print(summary)
    _print_skipped(console, report["skipped"], "files" if images is None else "instances")
    balance = _table("class balance", "KL grade", "images")
    for grade, count in report["class_counts"].items():
        balance.add_row(str(grade), _share(count, report["usable"]))
    console.print(balance)
    console.print(f"fingerprint: {report['fingerprint']}")
    if report["usable"] < minimum:
        _problem(console, f"{report['usable']} usable images, fewer than the policy's minimum of {minimum}: "
                          "the node would refuse to train")
        return 0
    return report["usable"]


def _oncology(console: Console, folder: Path, name: str, declared: list[str], minimum: int) -> int:
    columns = list(read_cohort(folder, name).columns)
    # with declared features, any other column is simply not read; without, identifier-like names are refused
    suspicious = [] if declared else [c for c in columns if c not in RESERVED and identifier_like(c)]
    # read it as the node would; with identifier-like columns, as it would once they are dealt with
    usable_columns = declared or (sorted(c for c in columns if c not in RESERVED and c not in suspicious)
                                  if suspicious else None)  # None: the node's own default (every numeric column)
    if suspicious:  # first, so that it is said even when the cohort cannot be read for another reason
        _problem(console, f"columns whose names look like identifiers: {', '.join(suspicious)}. The node refuses "
                          "to use them: remove them from the export, or name the real features in run-config "
                          "features (then nothing else is read or named)")
    cohort = load_cohort(folder, name, features=usable_columns or None)
    events = np.concatenate([cohort.train.event, cohort.test.event])
    summary = _table(f"site {name}: oncology", "", "")
    summary.add_row("usable patients", f"{len(events)} ({len(cohort.train)} train, {len(cohort.test)} test)")
    summary.add_row("features", ", ".join(cohort.features))
    summary.add_row("event rate", f"{events.mean():.1%}")
    console.print(summary)
    _print_skipped(console, cohort.skipped, "rows")
    console.print(f"fingerprint: {cohort_fingerprint(folder)}")
    problems = len(suspicious) > 0
    if len(cohort.train) < minimum:
        _problem(console, f"{len(cohort.train)} patients in the training split, fewer than the policy's minimum "
                          f"of {minimum}: the node would refuse to train")
        problems += 1
    return 0 if problems else len(events)


def _print_skipped(console: Console, skipped: dict[str, int], what: str) -> None:
    table = _table(f"skipped {what}: {sum(skipped.values())}", "reason", what)
    for reason, count in sorted(skipped.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(reason, str(count))
    console.print(table)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=any(columns))
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i else "left")
    return table


def _share(count: int, total: int) -> str:
    return f"{count} ({count / total:.0%})" if total else "0"
