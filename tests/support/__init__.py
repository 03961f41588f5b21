"""What the tests share: running the jobs as users do (`jobs`), the service and its stand-ins
(`service`), faults to inject (`faults`), and facts the deployment files must agree on (`deploy`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
