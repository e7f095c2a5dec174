"""The guided install, step by step: checks, kit, user, config, model, enrollment, PACS both ways, service."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.prompt import Confirm, IntPrompt, Prompt
from rich.table import Table

from installers.answers import Answers, PacsAnswer
from installers.bootstrap import clean_environment
from installers.edge_config import render_config, write_config
from installers.errors import AnswersError, MachineError, StepError
from installers.kit import BUNDLE_DIR, PUBLIC_KEY_FILE, KitManifest, verify_kit
from installers.layout import InstallRecord, Layout
from installers.machine import Check, MachineProbe, run_checks
from installers.pacs import EchoOutcome, InboundProbe, echo, send_test_report
from installers.service_user import ServiceUser, ensure_service_user, run_as
from installers.systemd_unit import (
    UNIT_NAME,
    UnitSpec,
    exec_start,
    render_unit,
    systemctl,
    systemd_running,
    verify_unit,
)

__all__ = ["Installation", "check_table", "find_bundle", "prompt_answers"]

STATUS_STYLE = {
    "ok": "[green]ok[/green]",
    "warn": "[yellow]warn[/yellow]",
    "fail": "[red]FAIL[/red]",
    "info": "info",
}


def check_table(title: str, checks: list[Check]) -> Table:
    table = Table(title=title)
    for column in ("check", "result", "detail", "what to do"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, STATUS_STYLE[check.status], check.detail, check.fix)
    return table


def find_bundle(root: Path) -> Path | None:
    """The bundle in a kit's (or version's) bundle/ folder: the folder itself, or the one .zip in it."""
    folder = root / BUNDLE_DIR
    if (folder / "manifest.json").is_file():
        return folder
    zips = sorted(folder.glob("*.zip"))
    return zips[0] if zips else None


def _ask_pacs(console: Console, label: str, default: PacsAnswer | None) -> PacsAnswer:
    console.print(f"[bold]{label}[/bold] (ask the PACS administrator)")
    while True:
        ae = Prompt.ask("  its AE title", default=default.ae_title if default else "PACS")
        host = Prompt.ask("  its address", default=default.host if default else None)
        port = IntPrompt.ask("  its DICOM port", default=default.port if default else 104)
        try:
            return PacsAnswer(ae_title=ae, host=host or "", port=port)
        except ValueError as exc:
            console.print(f"  [red]{exc}[/red]")


def prompt_answers(console: Console, start: Answers) -> Answers:
    """Ask every question, each with the answers file's value (or the default) as the proposed answer."""
    data = start.model_dump()
    while True:
        data["ae_title"] = Prompt.ask("This node's AE title (the PACS will call it)", default=start.ae_title)
        data["port"] = IntPrompt.ask("This node's DICOM port", default=start.port)
        allowed = Prompt.ask(
            "AE titles allowed to send studies (comma separated, empty: any)",
            default=",".join(start.allowed_calling_aes),
        )
        data["allowed_calling_aes"] = [a.strip() for a in allowed.split(",") if a.strip()]
        data["data_dir"] = Path(
            Prompt.ask("Data directory (study spool, database)", default=str(start.data_dir))
        )
        data["pacs"] = _ask_pacs(console, "The PACS that sends studies and receives results", start.pacs)
        data["join_code"] = Prompt.ask(
            "Join code from the hub operator (empty: skip)", default=start.join_code
        )
        data["wait_for_pacs_seconds"] = (
            180.0
            if Confirm.ask("Test a C-ECHO or study sent from the PACS during the install?", default=True)
            else 0.0
        )
        data["send_test_report"] = Confirm.ask(
            "Send a test report to the PACS?", default=start.send_test_report
        )
        try:
            return Answers(**data)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red] - let us go through the questions again")


@dataclass
class Installation:
    """One install run; ``interactive`` asks before acting, else every answer must be in ``answers``."""

    kit: Path
    layout: Layout
    version_dir: Path
    answers: Answers
    console: Console
    interactive: bool
    expected_key: str | None = None

    def _step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")

    def _edge(self, user: ServiceUser, *args: str) -> subprocess.CompletedProcess[str]:
        binary = self.layout.edge_binary(through_current=False, version_dir=self.version_dir)
        return run_as(user, [str(binary), *args], env=clean_environment(), timeout=600)

    def check_machine(self) -> list[Check]:
        self._step("1. this computer")
        bundle = find_bundle(self.kit)
        model = bundle / "model.onnx" if bundle is not None and bundle.is_dir() else None
        probe = MachineProbe(
            data_dir=self.answers.data_dir,
            node_host=self.answers.listen_host,
            node_port=self.answers.port,
            hub_url=self.answers.hub_url or None,
            model=model,
        )
        checks = run_checks(probe)
        self.console.print(check_table("machine checks", checks))
        failed = [c for c in checks if c.status == "fail"]
        if failed:
            raise MachineError("; ".join(f"{c.name}: {c.detail} ({c.fix})" for c in failed))
        return checks

    def verify(self) -> KitManifest:
        self._step("2. the kit")
        manifest, fingerprint = verify_kit(self.kit, self.expected_key)
        self.console.print(
            f"kit verified: fedclinic {manifest.fedclinic_version} ({manifest.variant}), every file's sha256 "
            f"matches, signed by key [bold]{fingerprint}[/bold]",
            highlight=False,
        )
        confirm = f"Is {fingerprint} the key fingerprint the hub operator gave you?"
        if self.expected_key is None and self.interactive and not Confirm.ask(confirm, default=False):
            raise StepError("the kit's key was not confirmed; ask the hub operator for the fingerprint")
        self.console.print(f"installed offline in {self.version_dir / 'venv'}")
        return manifest

    def prepare_user_and_config(self) -> ServiceUser:
        self._step("3. service user and settings")
        answers = self.answers
        user = ensure_service_user(answers.service_user, answers.data_dir)
        answers.data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(answers.data_dir, user.uid, user.gid)
        os.chmod(answers.data_dir, 0o700)
        keys = answers.config_path.parent / PUBLIC_KEY_FILE
        keys.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.kit / PUBLIC_KEY_FILE, keys)
        os.chmod(keys, 0o644)
        write_config(answers.config_path, render_config(answers, keys), user)
        self.console.print(
            f"user [bold]{user.name}[/bold] (uid {user.uid}); settings in {answers.config_path} (mode 0600, "
            f"owner {user.name}); data in {answers.data_dir}",
            highlight=False,
        )
        return user

    def install_model(self, user: ServiceUser) -> None:
        bundle = find_bundle(self.kit)
        if bundle is None:
            self.console.print("no model in the kit: the node gets its model from the hub after enrollment")
            return
        # Copy into the root-owned version folder: the service user may not be able to read the kit's folder.
        local = self.version_dir / BUNDLE_DIR
        if not local.exists():
            shutil.copytree(self.kit / BUNDLE_DIR, local)
        target = find_bundle(self.version_dir)
        assert target is not None
        done = self._edge(user, "install-bundle", str(target), "--config", str(self.answers.config_path))
        if done.returncode != 0:
            raise StepError(f"installing the kit's model failed: {(done.stderr or done.stdout).strip()}")
        self.console.print(f"model installed: {done.stdout.strip()}", highlight=False)

    def enroll(self, user: ServiceUser, manifest: KitManifest) -> bool:
        self._step("4. enrollment with the hub")
        code = self.answers.join_code or manifest.join_code or ""
        if not code:
            self.console.print("no join code: skipped (enroll later: fedclinic-edge enroll CODE)")
            return False
        if self._edge(user, "enroll", "--help").returncode != 0:
            self.console.print("[yellow]this fedclinic version cannot enroll yet; skipped[/yellow]")
            return False
        done = self._edge(user, "enroll", code, "--config", str(self.answers.config_path))
        if done.returncode != 0:
            raise StepError(
                f"enrollment failed: {(done.stderr or done.stdout).strip()}; check that HTTPS to the hub "
                "is allowed "
                "and that the join code is unused and not expired (ask the hub operator for a new one)"
            )
        self.console.print("[green]enrolled[/green]")
        return True

    def _print_outcome(self, what: str, outcome: EchoOutcome) -> None:
        if outcome.ok:
            self.console.print(
                f"[green]ok[/green] {what} {outcome.address} ({outcome.milliseconds:.0f} ms)", highlight=False
            )
        else:
            self.console.print(
                f"[red]FAILED[/red] {what} {outcome.address}: {outcome.problem}", highlight=False
            )
            self.console.print(f"   what to do: {outcome.fix}", highlight=False)

    def test_pacs(self) -> list[str]:
        """The PACS both ways; returns the problems (empty when everything answered)."""
        self._step("5. the PACS, both ways")
        answers = self.answers
        problems: list[str] = []
        if answers.pacs is None:
            self.console.print("no PACS configured: results stay in the data directory")
            return problems
        out = echo(answers.pacs.host, answers.pacs.port, answers.pacs.ae_title, answers.ae_title)
        self._print_outcome("C-ECHO to", out)
        if not out.ok:
            problems.append(f"C-ECHO to the PACS: {out.problem}")
        if answers.wait_for_pacs_seconds > 0:
            problems += self._wait_for_pacs(answers.wait_for_pacs_seconds)
        if answers.send_test_report and out.ok:
            target = answers.test_destination or answers.pacs
            sent = send_test_report(target.host, target.port, target.ae_title, answers.ae_title)
            self._print_outcome("test report (SR) sent to", sent)
            if not sent.ok:
                problems.append(f"test report: {sent.problem}")
        return problems

    def _wait_for_pacs(self, seconds: float) -> list[str]:
        answers = self.answers
        self.console.print(
            f"Now send a C-ECHO or a test study from the PACS to AE [bold]{answers.ae_title}[/bold], this "
            f"computer, port [bold]{answers.port}[/bold]. Waiting up to {seconds:.0f} s...",
            highlight=False,
        )
        try:
            with InboundProbe(answers.ae_title, answers.listen_host, answers.port) as probe:
                arrivals = probe.wait(seconds)
                # A study comes as several instances; give the rest a moment so the count is right.
                if arrivals and arrivals[0].kind == "C-STORE":
                    arrivals = probe.wait(3.0, count=10_000)
        except OSError as exc:
            return [f"cannot listen on port {answers.port}: {exc}"]
        if not arrivals:
            self.console.print(
                f"[red]nothing arrived[/red]: the PACS could not reach this computer on port "
                f"{answers.port}. Check "
                f"that the PACS has AE {answers.ae_title} at this computer's address and "
                f"port {answers.port}, and "
                "that the firewall here allows it (e.g. ufw allow {answers.port}/tcp)",
                highlight=False,
            )
            return ["nothing arrived from the PACS"]
        for arrival in arrivals[:5]:
            self.console.print(
                f"[green]arrived[/green] {arrival.kind} from {arrival.calling_ae}: {arrival.what}"
            )
        if len(arrivals) > 5:
            self.console.print(f"... and {len(arrivals) - 5} more")
        return []

    def start_service(self, user: ServiceUser, manifest: KitManifest) -> tuple[Path, list[str]]:
        self._step("6. the service")
        answers = self.answers
        spec = UnitSpec(
            edge_binary=self.layout.edge_binary(),
            config=answers.config_path,
            data_dir=answers.data_dir,
            user=user.name,
            port=answers.port,
            memory_max=answers.memory_max,
            gpu=manifest.variant == "gpu",
        )
        unit_path = answers.unit_dir / UNIT_NAME
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        unit_path.write_text(render_unit(spec))
        complaint = verify_unit(unit_path)
        if complaint:
            raise StepError(f"systemd-analyze verify rejects {unit_path}:\n{complaint}")
        command = exec_start(spec)
        if systemd_running():
            systemctl("daemon-reload")
            systemctl("enable", "--now", UNIT_NAME)  # Type=notify: returns once the node is ready
            self.console.print(f"[green]service {UNIT_NAME} running[/green]; logs: journalctl -u {UNIT_NAME}")
        else:
            self.console.print(
                f"[yellow]systemd is not running on this computer[/yellow] (it is not PID 1), so the service "
                f"{unit_path} was written but not started. Start the node with:",
                highlight=False,
            )
            self.console.print(
                f"  runuser -u {user.name} -- {' '.join(command)}", highlight=False, soft_wrap=True
            )
        return unit_path, command

    def run(self) -> InstallRecord:
        self.check_machine()
        manifest = self.verify()
        user = self.prepare_user_and_config()
        self.install_model(user)
        self.enroll(user, manifest)
        problems = self.test_pacs()
        previous = self.layout.activate(self.version_dir)
        unit_path, _command = self.start_service(user, manifest)
        record = InstallRecord(
            config=str(self.answers.config_path),
            data_dir=str(self.answers.data_dir),
            service_user=user.name,
            unit_path=str(unit_path),
            version_dir=str(self.version_dir),
            ae_title=self.answers.ae_title,
            port=self.answers.port,
            listen_host=self.answers.listen_host,
            previous_version_dir=str(previous) if previous and previous != self.version_dir else None,
            hub_url=self.answers.hub_url,
        )
        self.layout.write_record(record)
        self.console.rule("[bold]done")
        self.console.print(
            f"fedclinic {manifest.fedclinic_version} installed in {self.layout.current}. Settings: "
            f"{self.answers.config_path}. Check everything again any time with: "
            f"{self.layout.current}/venv/bin/fedclinic-install doctor --prefix {self.layout.prefix}",
            highlight=False,
        )
        if problems:
            self.console.print("[yellow]to fix (the node is installed):[/yellow] " + "; ".join(problems))
        return record


def ensure_answers_complete(
    answers: Answers, interactive: bool, ask: Callable[[Answers], Answers]
) -> Answers:
    """Interactive runs ask every question; unattended runs use the answers as they are."""
    if interactive:
        return ask(answers)
    if answers.pacs is None and answers.wait_for_pacs_seconds > 0:
        raise AnswersError("wait_for_pacs_seconds needs a [pacs] table in the answers file")
    return answers
