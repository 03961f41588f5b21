"""`raysft`: run the service, and drive it over REST.

    raysft serve                                   # embedded default: local Ray, SQLite, .raysft/
    raysft submit pipeline configs/pipelines/demo.yaml
    raysft jobs list | get ID | logs ID [--follow] | metrics ID | cancel ID | wait ID
    raysft files upload PATH... | list | delete ID   # then `uri: file:<id>` in a dataset spec
    raysft admin tenants create|list · raysft admin keys create|list|revoke

Clients read RAYSFT_URL (default http://127.0.0.1:8000) and RAYSFT_API_KEY. Exit codes: 0 done
(and `wait`: the job SUCCEEDED), 1 the job ended otherwise, 2 a request was refused (invalid spec,
unknown job, bad key), 3 the service could not be reached.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
import yaml

from jobs.common.overrides import apply_overrides
from jobs.common.spec import SpecError

DEFAULT_URL = "http://127.0.0.1:8000"
# Shown under every client command's help: what it reads from the environment and how it exits.
ENVIRONMENT = (f"Environment: RAYSFT_URL, the service's address (default {DEFAULT_URL}); RAYSFT_API_KEY, an API "
               "key of your tenant. Exit codes: 0 done, 1 the job ended otherwise, 2 refused, 3 unreachable.")
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0], epilog=ENVIRONMENT)
jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and cancel jobs.", epilog=ENVIRONMENT)
app.add_typer(jobs_app, name="jobs")
files_app = typer.Typer(no_args_is_help=True, help="Upload, list and delete your tenant's files (dataset inputs).",
                        epilog=ENVIRONMENT)
app.add_typer(files_app, name="files")
admin_app = typer.Typer(no_args_is_help=True, help="Tenants and their API keys (with an admin tenant's key).",
                        epilog=ENVIRONMENT)
tenants_app = typer.Typer(no_args_is_help=True, help="Create and list tenants.", epilog=ENVIRONMENT)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke a tenant's API keys.", epilog=ENVIRONMENT)
app.add_typer(admin_app, name="admin")
admin_app.add_typer(tenants_app, name="tenants")
admin_app.add_typer(keys_app, name="keys")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "LOST"}
JobId = Annotated[str, typer.Argument(help="A job id, as `submit` and `raysft jobs list` print it.")]
TenantId = Annotated[str, typer.Argument(help="A tenant id: lowercase letters, digits and '-'.")]
# What to do next, by the service's answer; {retry} is its Retry-After.
NEXT_STEPS = {
    401: "set RAYSFT_API_KEY to an API key of your tenant (the first one is the server's RAYSFT_ADMIN_API_KEY)",
    404: "`raysft jobs list` shows your tenant's jobs",
    413: "the body is over the service's limit (RAYSFT_MAX_BODY_BYTES): put large data in files the spec names",
    422: "fix what is listed and submit again",
    429: "retry in {retry} s, or wait for some of your running jobs to end",
    503: "the service's database or Ray is unavailable: retry shortly; its /readyz says which",
}


def service_url() -> str:
    return os.environ.get("RAYSFT_URL", DEFAULT_URL)


def client() -> httpx.Client:
    key = os.environ.get("RAYSFT_API_KEY", "")
    return httpx.Client(base_url=service_url(), timeout=30, headers={"Authorization": f"Bearer {key}"} if key else {})


def refusal(response: httpx.Response) -> str:
    """The service's refusal in its own words, each problem on a line, then what to do next."""
    is_json = "json" in response.headers.get("content-type", "")
    detail = response.json().get("detail") if is_json else response.text
    problems = detail.get("problems") if isinstance(detail, dict) else None
    text = f"error: {response.status_code}: " + ("\n  " + "\n  ".join(problems) if problems else str(detail))
    step = NEXT_STEPS.get(response.status_code)
    return text + (f"\nnext: {step.format(retry=response.headers.get('Retry-After', 'a few'))}" if step else "")


def request(method: str, path: str, **kwargs) -> httpx.Response:
    try:
        with client() as c:
            response = c.request(method, path, **kwargs)
    except httpx.TransportError as e:
        typer.echo(f"error: the service at {service_url()} is not reachable ({e})\n"
                   "next: start one with `raysft serve`, or set RAYSFT_URL to its address (a deployed one: "
                   "`kubectl port-forward`, see docs/deploy.md)", err=True)
        raise typer.Exit(3) from None
    if response.status_code >= 400:
        typer.echo(refusal(response), err=True)
        raise typer.Exit(2)
    return response


@app.command(epilog="Settings: RAYSFT_* environment variables (README, service/settings.py): RAYSFT_DATA_DIR, "
                     "RAYSFT_DATABASE_URL, RAYSFT_RAY_ADDRESS or RAY_ADDRESS, RAYSFT_ADMIN_API_KEY, ...")
def serve(host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000) -> None:
    """Run the service (API and dashboard at /ui/). With no Ray address configured, start a local
    Ray head and stop it on exit."""
    import uvicorn

    from service import local_ray
    from service.settings import get_settings

    settings = get_settings()
    head = None
    if not (settings.ray_address or os.environ.get("RAY_ADDRESS")):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        typer.echo("starting a local Ray head (token auth, dashboard on 127.0.0.1) ...")
        head = local_ray.start(num_cpus=local_ray.default_num_cpus(), log_path=settings.data_dir / "ray-head.log")
        os.environ.update(head.env)  # the service, and only it, holds the token
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would end the
    # process before `finally` could stop the Ray head.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run("service.app:create_app", factory=True, host=host, port=port)
    finally:
        if head is not None:
            head.stop()


@app.command("ray-head")
def ray_head(env_file: Annotated[Path, typer.Option(help="Where to write RAY_ADDRESS, RAY_AUTH_MODE and "
                                                         "RAY_AUTH_TOKEN for clients (mode 0600).")],
             num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs; default as `serve`.")] = None) -> None:
    """Start the embedded default's Ray head alone (token auth, dashboard on 127.0.0.1) for scripts
    and `ray job submit`; stop it on Ctrl-C or SIGTERM."""
    from service import local_ray

    env_file.parent.mkdir(parents=True, exist_ok=True)
    head = local_ray.start(num_cpus=num_cpus or local_ray.default_num_cpus(), log_path=env_file.with_suffix(".log"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{key}={value}\n" for key, value in head.env.items()))
        typer.echo(f"Ray head at {head.address}; client settings in {env_file}")
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        env_file.unlink(missing_ok=True)
        head.stop()


@app.command(epilog=ENVIRONMENT)
def submit(kind: Annotated[str, typer.Argument(help="dataset | training | pipeline | evaluation | sweep")],
           spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="spec file (YAML or JSON)")],
           idempotency_key: Annotated[str | None, typer.Option(help="resubmitting with it returns the same job")] = None,
           force: Annotated[bool, typer.Option(help="dataset or pipeline: prepare again even if its output was "
                                               "prepared from the same spec, inputs and tokenizer")] = False,
           wait_: Annotated[bool, typer.Option("--wait", help="wait for the job to end")] = False,
           overrides: Annotated[list[str] | None, typer.Option(
               "--set", metavar="PATH=VALUE", help="override a spec field, e.g. --set optim.lr=2e-4 (repeatable)")] = None,
           ) -> None:
    """Submit a spec; prints the job id (a sweep, {training, runs}: its id, then one training id per run)."""
    if kind not in ("dataset", "training", "pipeline", "evaluation", "sweep"):
        typer.echo("error: kind is dataset, training, pipeline, evaluation or sweep", err=True)
        raise typer.Exit(2)
    if wait_ and kind == "sweep":
        typer.echo("error: --wait follows one job: wait for a sweep's runs with `raysft jobs wait ID`", err=True)
        raise typer.Exit(2)
    if force and kind in ("training", "evaluation", "sweep"):
        typer.echo("error: --force prepares a dataset again: it is for dataset and pipeline jobs", err=True)
        raise typer.Exit(2)
    try:
        body = apply_overrides(yaml.safe_load(spec.read_text()), overrides or [])
    except SpecError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    params = {"force": "true"} if force else {}
    job = request("POST", f"/v1/{kind}s", json=body, headers=headers, params=params).json()
    typer.echo(job["id"])
    for run in job.get("jobs", []):  # a sweep's trainings
        typer.echo(run["id"])
    if wait_:
        wait(job["id"])


@jobs_app.command("list", epilog=ENVIRONMENT)
def list_jobs(kind: Annotated[str | None, typer.Option(help="dataset | training | pipeline | evaluation")] = None,
              status: Annotated[str | None, typer.Option(help="QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED | LOST")] = None,
              limit: Annotated[int, typer.Option(help="How many, newest first (at most 500).")] = 50) -> None:
    """List your tenant's jobs, newest first: id, kind, status, created."""
    params = {k: v for k, v in {"kind": kind, "status": status, "limit": limit}.items() if v is not None}
    page = request("GET", "/v1/jobs", params=params).json()
    for job in page["items"]:
        typer.echo(f"{job['id']}  {job['kind']:<9} {job['status']:<10} {job['created_at']}")
    typer.echo(f"{len(page['items'])} of {page['total']}")


@jobs_app.command(epilog=ENVIRONMENT)
def get(job_id: JobId) -> None:
    """Print a job as JSON: status, progress, latest metrics, artifacts, its spec."""
    typer.echo(json.dumps(request("GET", f"/v1/jobs/{job_id}").json(), indent=2))


@jobs_app.command(epilog=ENVIRONMENT)
def logs(job_id: JobId, follow: Annotated[bool, typer.Option(help="Keep printing until the job ends.")] = False,
         tail: Annotated[int, typer.Option(help="Lines from the end (without --follow).")] = 1000) -> None:
    """Print a job's Ray log (a pipeline's: its current job's)."""
    if not follow:
        typer.echo(request("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail}).text)
        return
    with client() as c, c.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None) as r:
        for chunk in r.iter_text():
            sys.stdout.write(chunk)
            sys.stdout.flush()


@jobs_app.command(epilog=ENVIRONMENT)
def metrics(job_id: JobId) -> None:
    """Print a training's (or a pipeline's) metric history as a table, one row per logged step."""
    typer.echo(metrics_table(request("GET", f"/v1/jobs/{job_id}/metrics").json()))


@jobs_app.command(epilog=ENVIRONMENT)
def cancel(job_id: JobId) -> None:
    """Stop a queued or running job (a pipeline: all of it); prints its status."""
    typer.echo(request("POST", f"/v1/jobs/{job_id}/cancel").json()["status"])


@jobs_app.command(epilog=ENVIRONMENT)
def wait(job_id: JobId, interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 2.0) -> None:
    """Show progress until the job ends; exit 0 only if it SUCCEEDED."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(job_id[:12], total=100, detail="")
        while True:
            job = request("GET", f"/v1/jobs/{job_id}").json()
            p = job["progress"]
            step = f"step {p['step']}/{p['total_steps']}" if p.get("total_steps") else ""
            bar.update(task, completed=p.get("percent") or 0,
                       detail=f"{job['status']} {p.get('stage') or ''} {step}".strip())
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)
    typer.echo(f"{job['status']}" + (f": {job['error']}" if job.get("error") else ""))
    typer.echo(result_summary(job))
    raise typer.Exit(0 if job["status"] == "SUCCEEDED" else 1)


def result_summary(job: dict) -> str:
    """Final metrics, where the outputs are, and one generated answer."""
    lines = []
    if job["progress"].get("reused"):
        lines.append("dataset reused: already prepared from the same spec, inputs and tokenizer (--force prepares again)")
    metrics = job.get("metrics") or {}
    if job["kind"] == "evaluation":  # the model's figures, and the base model's where it had an adapter
        for label, figures in (("model", metrics.get("metrics")), ("base model", metrics.get("base_metrics"))):
            if figures:
                lines.append(f"{label}: " + ", ".join(f"{k} {round(v, 4)}" for k, v in figures.items()))
    shown = {k: round(metrics[k], 4) for k in ("step", "loss", "eval_loss", "perplexity", "token_accuracy", "sequence_accuracy")
             if k in metrics}
    if shown:
        lines.append("final metrics: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    for name, uri in job.get("artifacts", {}).items():
        lines.append(f"{name}: {uri[-1] if isinstance(uri, list) and uri else uri}")
    for generation in metrics.get("generations", [])[:1]:
        lines.append(f"prompt: {generation['prompt']}\nanswer: {generation['answer']}")
    return "\n".join(lines)


class _Counted:
    """A file read by the HTTP client, reporting each chunk to a progress bar."""

    def __init__(self, file, advance):
        self.file, self.advance = file, advance

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.advance(len(data))
        return data

    def __getattr__(self, name):  # fileno, seek, tell: how the client sizes the body
        return getattr(self.file, name)


@files_app.command(epilog=ENVIRONMENT)
def upload(paths: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Files to upload: JSONL, "
                                                       "JSON, CSV, Parquet or text.")]) -> None:
    """Upload files, each with a progress bar, streamed (never read whole). Prints each one's id:
    name it in a dataset spec as `uri: file:<id>`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    uploaded = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar:
        for path in paths:
            task = bar.add_task(path.name, total=path.stat().st_size)
            with path.open("rb") as f:
                body = _Counted(f, lambda n, task=task: bar.advance(task, n))
                uploaded.append((path, request("POST", "/v1/files", files={"file": (path.name, body)},
                                               timeout=None).json()))
    for path, created in uploaded:
        typer.echo(f"{created['id']}  {created['bytes']} bytes  sha256 {created['sha256']}  {path}")


@files_app.command("list", epilog=ENVIRONMENT)
def list_files(limit: Annotated[int, typer.Option(help="How many, newest first (at most 500).")] = 50) -> None:
    """List your tenant's files: id, bytes, uploaded, name."""
    page = request("GET", "/v1/files", params={"limit": limit}).json()
    for f in page["items"]:
        typer.echo(f"{f['id']}  {f['bytes']:>12}  {f['created_at']}  {f['filename']}")
    typer.echo(f"{len(page['items'])} of {page['total']}")


@files_app.command(epilog=ENVIRONMENT)
def delete(file_id: Annotated[str, typer.Argument(help="The file's id, as `upload` and `list` print it.")]) -> None:
    """Delete a file. Jobs already submitted that have not read it yet will fail to."""
    typer.echo(f"deleted {request('DELETE', f'/v1/files/{file_id}').json()['filename']}")


@tenants_app.command("create", epilog=ENVIRONMENT)
def create_tenant(tenant: TenantId) -> None:
    """Create a tenant; then give it a key with `raysft admin keys create TENANT`."""
    typer.echo(request("POST", "/v1/admin/tenants", json={"id": tenant}).json()["id"])


@tenants_app.command("list", epilog=ENVIRONMENT)
def list_tenants() -> None:
    """List tenants with their number of active keys."""
    for tenant in request("GET", "/v1/admin/tenants").json():
        typer.echo(f"{tenant['id']}  {tenant['active_keys']} active key(s)  created {tenant['created_at']}")


@keys_app.command("create", epilog=ENVIRONMENT)
def create_key(tenant: TenantId,
               name: Annotated[str, typer.Option(help="What the key is for (a person, a CI system).")] = "") -> None:
    """Create an API key for a tenant. The key is printed once, alone on stdout; it is stored
    only hashed and cannot be shown again."""
    created = request("POST", f"/v1/admin/tenants/{tenant}/keys", json={"name": name}).json()
    typer.echo(f"key {created['id']} for tenant {tenant}: store it now, it is not shown again", err=True)
    typer.echo(created["key"])


@keys_app.command("list", epilog=ENVIRONMENT)
def list_keys(tenant: TenantId) -> None:
    """List a tenant's keys: id, first characters, name, created, last used, revoked."""
    for key in request("GET", f"/v1/admin/tenants/{tenant}/keys").json():
        state = f"revoked {key['revoked_at']}" if key["revoked_at"] else "active"
        typer.echo(f"{key['id']}  {key['prefix']}…  {key['name'] or '-'}  created {key['created_at']}  "
                   f"last used {key['last_used_at'] or 'never'}  {state}")


@keys_app.command("revoke", epilog=ENVIRONMENT)
def revoke_key(key_id: Annotated[str, typer.Argument(help="The key's id, as `raysft admin keys list` shows it.")]) -> None:
    """Revoke a key: refused at once by the replica that answers, by every replica within the
    service's key cache lifetime (RAYSFT_KEY_CACHE_TTL_S, 10 s by default)."""
    typer.echo(f"revoked {request('DELETE', f'/v1/admin/keys/{key_id}').json()['revoked_at']}")


METRIC_COLUMNS = {"step": "step", "loss": "loss", "lr": "lr", "grad_norm": "grad norm", "eval_loss": "eval loss",
                  "perplexity": "perplexity", "token_accuracy": "token acc", "sequence_accuracy": "seq acc",
                  "tokens_per_s": "tokens/s"}


def metrics_table(history: list[dict]) -> str:
    """The columns any entry has, in a fixed order; a blank where an entry lacks one (eval
    metrics exist only at evaluations)."""
    if not history:
        return "no metrics yet"
    columns = [c for c in METRIC_COLUMNS if any(c in entry for entry in history)]

    def cell(value) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [[METRIC_COLUMNS[c] for c in columns]] + [[cell(e.get(c)) for c in columns] for e in history]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main() -> None:
    app()
