"""Real ``kamiyo serve`` / ``kamiyo worker`` processes for the issue-4 tests, on the e2e harness.

Adds what the e2e harness does not know: the telemetry settings are scrubbed from the inherited
environment like every other kamiyo setting, and a ``kamiyo worker`` process can be started on
the same database and environment.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from e2e.harness import KamiyoServer, kamiyo_command, wait_until
from kamiyo.config import load_settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from support import throwaway_postgres

_MORE_KEYS = ("METRICS_ENABLED", "PROMETHEUS_MULTIPROC_DIR", "STRIPE_SECRET_KEY", "STRIPE_API_BASE")


class Server(KamiyoServer):
    def env(self, **overrides: str) -> dict[str, str]:
        env = super().env()
        for key in _MORE_KEYS:
            if key not in self.settings:
                env.pop(key, None)
        env.update(overrides)
        return env

    def upgrade(self) -> None:
        """Migrate in this process: the same Alembic code as `kamiyo db upgrade`, a second faster."""
        settings = load_settings(self.env(), env_file=None)
        engine = make_engine(settings)
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    @contextmanager
    def worker(self) -> Iterator[subprocess.Popen[bytes]]:
        """A ``kamiyo worker`` process on this server's database and settings, stopped afterwards."""
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [*kamiyo_command(), "worker"],
                cwd=self.workdir,
                env=self.env(),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def metrics_text(self) -> str:
        answer = self.http.get("/metrics")
        assert answer.status_code == 200, answer.text
        return answer.text

    def wait_status(self, event_id: str, status: str) -> None:
        wait_until(lambda: self.event_status(event_id) == status, what=f"{event_id} to be {status}")


ServerFactory = Callable[..., Server]


def server_factory(stack: ExitStack, make_dir: Callable[[], Path]) -> ServerFactory:
    def make(
        backend: str = "sqlite", *, start: bool = True, database_url: str | None = None, **settings: str
    ) -> Server:
        """A migrated database (or ``database_url``, shared with another server) and a running server."""
        workdir = make_dir()
        if database_url is not None:
            url = database_url
        elif backend == "sqlite":
            url = f"sqlite:///{workdir / 'kamiyo.db'}"
        elif backend == "postgres":
            url = stack.enter_context(throwaway_postgres())
        else:
            raise ValueError(backend)
        server = Server(workdir, url, **settings)
        stack.callback(server.close)
        if database_url is None:
            server.upgrade()
        if start:
            server.start()
        return server

    return make
