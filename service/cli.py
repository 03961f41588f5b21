"""`raysft`: run the service, and drive it over REST.

    raysft serve                                   # embedded default: local Ray, SQLite, .raysft/
    raysft submit pipeline configs/pipelines/demo.yaml
    raysft jobs list | get ID | logs ID [--follow] | cancel ID | wait ID

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

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])
jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and cancel jobs.")
app.add_typer(jobs_app, name="jobs")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "LOST"}


def client() -> httpx.Client:
    key = os.environ.get("RAYSFT_API_KEY", "")
    return httpx.Client(base_url=os.environ.get("RAYSFT_URL", "http://127.0.0.1:8000"), timeout=30,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def request(method: str, path: str, **kwargs) -> httpx.Response:
    try:
        with client() as c:
            response = c.request(method, path, **kwargs)
    except httpx.TransportError as e:
        typer.echo(f"error: the service is not reachable: {e}", err=True)
        raise typer.Exit(3) from None
    if response.status_code >= 400:
        detail = response.json().get("detail") if "json" in response.headers.get("content-type", "") else response.text
        problems = detail.get("problems") if isinstance(detail, dict) else None
        typer.echo(f"error: {response.status_code}: " + ("\n  " + "\n  ".join(problems) if problems else str(detail)), err=True)
        raise typer.Exit(2)
    return response


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service. With no Ray address configured, start a local Ray head and stop it on exit."""
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


@app.command()
def submit(kind: Annotated[str, typer.Argument(help="dataset | training | pipeline")],
           spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="spec file (YAML or JSON)")],
           idempotency_key: Annotated[str | None, typer.Option(help="resubmitting with it returns the same job")] = None,
           wait_: Annotated[bool, typer.Option("--wait", help="wait for the job to end")] = False) -> None:
    """Submit a spec; prints the job id."""
    if kind not in ("dataset", "training", "pipeline"):
        typer.echo("error: kind is dataset, training or pipeline", err=True)
        raise typer.Exit(2)
    body = yaml.safe_load(spec.read_text())
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    job = request("POST", f"/v1/{kind}s", json=body, headers=headers).json()
    typer.echo(job["id"])
    if wait_:
        wait(job["id"])


@jobs_app.command("list")
def list_jobs(kind: str | None = None, status: str | None = None, limit: int = 50) -> None:
    params = {k: v for k, v in {"kind": kind, "status": status, "limit": limit}.items() if v is not None}
    page = request("GET", "/v1/jobs", params=params).json()
    for job in page["items"]:
        typer.echo(f"{job['id']}  {job['kind']:<9} {job['status']:<10} {job['created_at']}")
    typer.echo(f"{len(page['items'])} of {page['total']}")


@jobs_app.command()
def get(job_id: str) -> None:
    typer.echo(json.dumps(request("GET", f"/v1/jobs/{job_id}").json(), indent=2))


@jobs_app.command()
def logs(job_id: str, follow: bool = False, tail: int = 1000) -> None:
    if not follow:
        typer.echo(request("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail}).text)
        return
    with client() as c, c.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None) as r:
        for chunk in r.iter_text():
            sys.stdout.write(chunk)
            sys.stdout.flush()


@jobs_app.command()
def cancel(job_id: str) -> None:
    typer.echo(request("POST", f"/v1/jobs/{job_id}/cancel").json()["status"])


@jobs_app.command()
def wait(job_id: str, interval: float = 2.0) -> None:
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
    metrics = job.get("metrics") or {}
    shown = {k: round(metrics[k], 4) for k in ("step", "loss", "eval_loss", "perplexity", "token_accuracy") if k in metrics}
    if shown:
        lines.append("final metrics: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    for name, uri in job.get("artifacts", {}).items():
        lines.append(f"{name}: {uri[-1] if isinstance(uri, list) and uri else uri}")
    for generation in metrics.get("generations", [])[:1]:
        lines.append(f"prompt: {generation['prompt']}\nanswer: {generation['answer']}")
    return "\n".join(lines)


def main() -> None:
    app()
