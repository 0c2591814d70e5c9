"""Benchmark: how fast a node retrieves its site's images from a PACS (client/data/pacs.py).

An Orthanc (Debian's package, tests/pacs_server.py) on 127.0.0.1 holds the five
radiology demo regions (690 labelled knee radiographs as real DICOM, plus the
unlabelled image and the SR of the broken region), uploaded through its REST
API, less a held-back share of every region. For each protocol (DICOMweb:
QIDO-RS + WADO-RS through dicomweb-client; DIMSE: C-FIND + C-GET through
pynetdicom) the node syncs:

- cold: into an empty cache, everything the query finds;
- unchanged: again, nothing new (the query and the listing of the node's copy);
- incremental: after the held-back instances arrived at the PACS, only those.

Instances/s of the retrieval (WADO-RS or C-GET, and the atomic write) and of the
whole sync (query included); MB/s of the instances written. Orthanc, the node
and this script share the machine's cores. One run; timings are not asserted
anywhere.

Not a pytest test; ``make bench-pacs`` or ``.venv/bin/python tests/bench_pacs.py --hold-back 0.2``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import pacs_server  # a sibling: the benchmarks run as scripts
from client.data import pacs
from client.data.radiology_demo import write_radiology_demo

console = Console(width=160)
PASSWORD = "bench-pacs-password"
QUERY = '[query]\nmodality = ["CR", "DX", "SR"]\n'


def main(
    hold_back: float = typer.Option(0.1, help="Share of each region's files uploaded only before the incremental sync."),
    images: int = typer.Option(0, help="Labelled images per region (0 = the demo's 180/150/140/120/100)."),
    seed: int = typer.Option(42, help="Demo data seed."),
    protocols: str = typer.Option("dicomweb,dimse", help="Comma list: dicomweb, dimse."),
) -> None:
    """Cold, unchanged and incremental syncs from Orthanc on 127.0.0.1, per protocol."""
    if reason := pacs_server.missing():
        raise typer.Exit(console.print(f"[red]{reason}[/red]") or 1)
    started = time.perf_counter()
    chosen = [p.strip() for p in protocols.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-pacs-") as name:
        folder = Path(name)
        folders = write_radiology_demo(folder / "demo", 5, seed, images or None)
        first, later = [], []
        for region in folders:
            files = sorted(p for p in region.rglob("*") if p.is_file() and p.name != "labels.csv")
            cut = len(files) - max(1, round(len(files) * hold_back))
            first += files[:cut]
            later += files[cut:]
        site = folder / "site"
        site.mkdir()
        credentials = folder / "credentials"
        credentials.write_text(f"{pacs_server.USER}:{PASSWORD}\n")
        with pacs_server.running(folder / "orthanc", PASSWORD) as orthanc:
            upload = time.perf_counter()
            stored = orthanc.upload(first)
            upload = time.perf_counter() - upload
            console.log(f"Orthanc {orthanc.url}: {stored} instances uploaded in {upload:.1f} s (REST)")
            addresses = {"dicomweb": orthanc.dicomweb, "dimse": orthanc.dimse}
            (site / "pacs.toml").write_text(QUERY)
            rows = []
            sources = {p: pacs.pacs_source(site, f"bench-{p}", {"pacs": addresses[p],
                                                                 "pacs-credentials": str(credentials)})
                       for p in chosen}
            for protocol, source in sources.items():
                for phase in ("cold", "unchanged"):
                    rows.append((protocol, phase, *_sync(source, folder / "cache")))
                    console.log(f"{protocol} {phase}: {_shown(rows[-1][2])}")
            stored_later = orthanc.upload(later)
            console.log(f"{stored_later} more instances uploaded")
            for protocol, source in sources.items():
                rows.append((protocol, "incremental", *_sync(source, folder / "cache")))
                console.log(f"{protocol} incremental: {_shown(rows[-1][2])}")
    report(rows)
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores, Orthanc "
          f"{pacs_server.version()} and the node on the same machine)")


def _sync(source: pacs.PacsSource, cache: Path) -> tuple[pacs.PacsSync, int]:
    """One sync, and the bytes of the instances it wrote."""
    copy = cache / pacs.MIRROR / source.key
    before = {p.name for p in copy.glob("*.dcm")}
    result = pacs.sync(source, cache)
    return result, sum(p.stat().st_size for p in copy.glob("*.dcm") if p.name not in before)


def _shown(result: pacs.PacsSync) -> str:
    return (f"{result.found} found, {result.retrieved} retrieved, {result.cached} cached in {result.seconds:.2f} s "
            f"(retrieval {result.retrieval_seconds:.2f} s)")


def report(rows: list[tuple[str, str, pacs.PacsSync, int]]) -> None:
    table = Table(title="Retrieval from a PACS (Orthanc on 127.0.0.1): one run")
    for column in ("protocol", "sync", "found", "retrieved", "already cached", "sync s", "retrieval s",
                   "retrieved/s", "found/s (whole sync)", "MB/s"):
        table.add_column(column, justify="left" if column in ("protocol", "sync") else "right")
    for protocol, phase, result, written in rows:
        rate = f"{result.retrieved / result.retrieval_seconds:.0f}" if result.retrieved else "–"
        megabytes = f"{written / 1e6 / result.retrieval_seconds:.1f}" if result.retrieved else "–"
        table.add_row("DICOMweb (QIDO-RS, WADO-RS)" if protocol == "dicomweb" else "DIMSE (C-FIND, C-GET)", phase,
                      str(result.found), str(result.retrieved), str(result.cached), f"{result.seconds:.2f}",
                      f"{result.retrieval_seconds:.2f}", rate, f"{result.found / result.seconds:.0f}", megabytes)
    console.print(table)
    print("retrieved/s: instances retrieved and written (atomically) per second of retrieval; found/s: instances the "
          "query found per second of the whole sync (query, retrieval, listing the node's copy).")


if __name__ == "__main__":
    typer.run(main)
