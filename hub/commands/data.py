"""`fedclinic-hub data`: list local MedMNIST datasets (with md5 check) and download official files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from edge_node.protocol.durable_file import replace_durably
from hub.commands.choices import DatasetName, Split
from hub.commands.output import EXIT_FAILED, FormatOption, OutputFormat, emit
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
    output: FormatOption = OutputFormat.table,
) -> None:
    """Show the known datasets, whether they are present, and whether their md5 is the official one.

    Example: fedclinic-hub data list --format json
    """
    base = root or data_root()
    rows: list[dict[str, object]] = []
    for name in sorted(OFFICIAL_MD5):
        path = medmnist_path(name, base)
        present = path.is_file()
        rows.append(
            {
                "name": name,
                "labels": list(LABELS[name]),
                "file": str(path),
                "present": present,
                "size_bytes": path.stat().st_size if present else None,
                "md5_official": md5_file(path) == OFFICIAL_MD5[name] if present else None,
            }
        )

    def render(console: Console) -> None:
        table = Table(title=f"MedMNIST datasets in {base / 'medmnist'}")
        for col in ("name", "labels", "file", "size", "md5"):
            table.add_column(col)
        for row in rows:
            labels = ", ".join(LABELS[str(row["name"])])
            if not row["present"]:
                table.add_row(str(row["name"]), labels, "[yellow]missing[/yellow]", "-", "-")
                continue
            size = row["size_bytes"]
            table.add_row(
                str(row["name"]),
                labels,
                str(row["file"]),
                f"{size / 1e6:.1f} MB" if isinstance(size, int) else "-",
                "[green]official[/green]" if row["md5_official"] else "[red]MISMATCH[/red]",
            )
        console.print(table)

    emit(output, {"root": str(base / "medmnist"), "datasets": rows}, render)


@app.command("download")
def download(
    dataset: Annotated[DatasetName, typer.Argument(metavar="NAME", help="Dataset to download.")],
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
    import httpx

    console = Console()
    name = dataset.value
    url = url.format(name=name)
    dest = medmnist_path(name, root or data_root())
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".part")
    except OSError as exc:
        console.print(
            f"[red]cannot write to {dest.parent}:[/red] {exc.strerror}; pass --root or set {DATA_ENV}"
        )
        raise typer.Exit(EXIT_FAILED) from exc
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
        raise typer.Exit(EXIT_FAILED) from exc
    md5 = md5_file(tmp)
    if md5 != OFFICIAL_MD5[name]:
        tmp.unlink(missing_ok=True)
        console.print(
            f"[red]md5 mismatch[/red] for {url}: got {md5}, expected {OFFICIAL_MD5[name]}; not saved"
        )
        raise typer.Exit(EXIT_FAILED)
    replace_durably(tmp, dest)
    console.print(f"saved {dest} (md5 {md5}, official)")


@app.command("dicomize")
def dicomize(
    dataset: Annotated[DatasetName, typer.Argument(metavar="NAME", help="Dataset whose images to wrap.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the DICOM files (one study per image).")],
    split: Annotated[Split, typer.Option("--split", help="Dataset split.")] = Split.test,
    count: Annotated[int, typer.Option("--count", min=1, help="How many images, from the start.")] = 4,
    modality: Annotated[
        str, typer.Option("--modality", help="CR for chest X-ray, US for ultrasound.")
    ] = "CR",
    root: Annotated[Path | None, typer.Option("--root", help=f"Data folder (default: ${DATA_ENV}).")] = None,
) -> None:
    """Wrap dataset images as DICOM studies with a synthetic patient, to send to a node from any PACS tool."""
    from hub.data.dicomize import dicomize_images
    from hub.data.medmnist import DataNotFoundError, load_medmnist

    name = dataset.value
    try:
        images = load_medmnist(name, split.value, root)
    except (DataNotFoundError, ValueError) as exc:
        Console().print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_FAILED) from exc
    written = dicomize_images(
        images.images,
        out,
        dataset=name,
        split=split.value,
        indices=range(min(count, len(images))),
        modality=modality,
    )
    table = Table(title=f"{len(written)} {modality} studies in {out}")
    for col in ("file", "label"):
        table.add_column(col)
    for w in written:
        table.add_row(w.path.name, LABELS[name][int(images.labels[w.index])])
    Console().print(table)


@app.command("public")
def public_set(
    out: Annotated[Path, typer.Option("--out", help="The npz to write, for `rounds start --public`.")],
    dataset: Annotated[
        DatasetName, typer.Option("--dataset", help="Public dataset every node may hold.")
    ] = DatasetName.pneumoniamnist,
    split: Annotated[Split, typer.Option("--split", help="Its split.")] = Split.val,
    size: Annotated[int, typer.Option("--size", min=1, help="The first SIZE images.")] = 512,
    soft_labels: Annotated[
        bool,
        typer.Option("--soft-labels/--no-soft-labels", help="Compute the foundation soft labels (FedHelp)."),
    ] = True,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Foundation model training passes.")] = 15,
    seed: Annotated[int, typer.Option("--seed", help="Foundation model seed.")] = 0,
    root: Annotated[Path | None, typer.Option("--root", help=f"Data folder (default: ${DATA_ENV}).")] = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """Write the public set a FedHelp or HSL round ships once: x (preprocessed as for inference, float32
    (N, 1, 28, 28)), y (its labels, float32) and, for FedHelp, the foundation model's soft labels computed
    once here (a deeper CNN trained on this public set; docs/learners.md).

    Example: fedclinic-hub data public --out public.npz --size 512
    """
    import numpy as np
    import torch

    from edge_node.protocol.tensors import encode_tensors
    from hub.data.medmnist import load_medmnist
    from hub.training.datasets import NORM_MEAN, NORM_STD
    from hub.training.foundation import TeacherSoftLabels

    if out.exists():
        Console(stderr=True).print(f"[red]error:[/red] {out} already exists; choose a new --out")
        raise typer.Exit(EXIT_FAILED)
    images = load_medmnist(dataset.value, split.value, root)
    if images.images.ndim != 3:
        Console(stderr=True).print(f"[red]error:[/red] {dataset.value} is not grey-scale")
        raise typer.Exit(EXIT_FAILED)
    x01 = images.images[:size, None].astype(np.float32) / np.float32(255.0)  # (N, 1, H, W) in [0, 1]
    y = images.labels[:size].reshape(-1).astype(np.float32)  # (N,)
    arrays = {"x": ((x01 - NORM_MEAN) / NORM_STD).astype(np.float32), "y": y}
    if soft_labels:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        console = Console(stderr=output is OutputFormat.json)
        with console.status(f"training the foundation model on {len(y)} public images ({epochs} passes)"):
            teacher = TeacherSoftLabels(torch.from_numpy(x01), torch.from_numpy(y), epochs=epochs, seed=seed)
            arrays["soft_labels"] = teacher.soft_labels(torch.from_numpy(x01))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_tensors(arrays))
    report = {
        "out": str(out),
        "dataset": dataset.value,
        "split": split.value,
        "images": len(y),
        "positives": int(y.sum()),
        "soft_labels": soft_labels,
        "bytes": out.stat().st_size,
    }
    emit(output, report, lambda console: console.print(report))
