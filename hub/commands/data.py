"""`fedclinic-hub data`: list local MedMNIST datasets (with md5 check) and download official files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from edge_node.protocol.durable_file import replace_durably
from hub.data.medmnist import DATA_ENV, DOWNLOAD_URL, LABELS, OFFICIAL_MD5, data_root, medmnist_path

app = typer.Typer(
    help="Local datasets: list them, verify them, download official files.", no_args_is_help=True
)


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@app.command("list")
def list_datasets(
    root: Annotated[Path | None, typer.Option("--root", help=f"Data folder (default: ${DATA_ENV}).")] = None,
) -> None:
    """Show the known datasets, whether they are present, and whether their md5 is the official one."""
    base = root or data_root()
    table = Table(title=f"MedMNIST datasets in {base / 'medmnist'}")
    for col in ("name", "labels", "file", "size", "md5"):
        table.add_column(col)
    for name in sorted(OFFICIAL_MD5):
        path = medmnist_path(name, base)
        if not path.is_file():
            table.add_row(name, ", ".join(LABELS[name]), "[yellow]missing[/yellow]", "-", "-")
            continue
        ok = md5_file(path) == OFFICIAL_MD5[name]
        table.add_row(
            name,
            ", ".join(LABELS[name]),
            str(path),
            f"{path.stat().st_size / 1e6:.1f} MB",
            "[green]official[/green]" if ok else "[red]MISMATCH[/red]",
        )
    Console().print(table)


@app.command("download")
def download(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. pneumoniamnist.")],
    root: Annotated[Path | None, typer.Option("--root", help=f"Data folder (default: ${DATA_ENV}).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Network timeout in seconds.")] = 30.0,
    url: Annotated[
        str,
        typer.Option(
            "--url", help="URL template with {name}, for a mirror; default: the official Zenodo file."
        ),
    ] = DOWNLOAD_URL,
) -> None:
    """Download an official MedMNIST file from Zenodo into the data folder and check its md5."""
    console = Console()
    if name not in OFFICIAL_MD5:
        console.print(f"[red]unknown dataset {name!r}[/red]; known: {', '.join(sorted(OFFICIAL_MD5))}")
        raise typer.Exit(2)
    url = url.format(name=name)
    dest = medmnist_path(name, root or data_root())
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".part")
    except OSError as exc:
        console.print(
            f"[red]cannot write to {dest.parent}:[/red] {exc.strerror}; pass --root or set {DATA_ENV}"
        )
        raise typer.Exit(1) from exc
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as fh,
            httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as resp,
        ):
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            columns = (TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("download", total=total)
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
                    progress.update(task, advance=len(chunk))
    except httpx.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        console.print(
            f"[red]download failed:[/red] {type(exc).__name__}: {exc}. This machine may be offline: "
            f"fetch {url} elsewhere, copy it to {dest}, or set {DATA_ENV} to a folder with that file"
        )
        raise typer.Exit(1) from exc
    md5 = md5_file(tmp)
    if md5 != OFFICIAL_MD5[name]:
        tmp.unlink(missing_ok=True)
        console.print(
            f"[red]md5 mismatch[/red] for {url}: got {md5}, expected {OFFICIAL_MD5[name]}; not saved"
        )
        raise typer.Exit(1)
    replace_durably(tmp, dest)
    console.print(f"saved {dest} (md5 {md5}, official)")


@app.command("dicomize")
def dicomize(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. pneumoniamnist.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the DICOM files (one study per image).")],
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    count: Annotated[int, typer.Option("--count", min=1, help="How many images, from the start.")] = 4,
    modality: Annotated[
        str, typer.Option("--modality", help="CR for chest X-ray, US for ultrasound.")
    ] = "CR",
    root: Annotated[Path | None, typer.Option("--root", help=f"Data folder (default: ${DATA_ENV}).")] = None,
) -> None:
    """Wrap dataset images as DICOM studies with a synthetic patient, to send to a node from any PACS tool."""
    from hub.data.dicomize import dicomize_images
    from hub.data.medmnist import DataNotFoundError, load_medmnist

    if split not in ("train", "val", "test"):
        raise typer.BadParameter("split must be train, val or test")
    try:
        images = load_medmnist(name, split, root)  # type: ignore[arg-type]
    except (DataNotFoundError, ValueError) as exc:
        Console().print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    written = dicomize_images(
        images.images,
        out,
        dataset=name,
        split=split,
        indices=range(min(count, len(images))),
        modality=modality,
    )
    table = Table(title=f"{len(written)} {modality} studies in {out}")
    for col in ("file", "label"):
        table.add_column(col)
    for w in written:
        table.add_row(w.path.name, LABELS[name][int(images.labels[w.index])])
    Console().print(table)
