"""Fixtures shared by every test tier.

``stack`` starts real Mosquitto, InfluxDB and the SMTP sink once per test session, in a
temporary work dir on free loopback ports, and stops them at the end. Nothing a test uses may
already be running on the machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.stack import StackInfo, running_stack


@pytest.fixture(scope="module")
def reloaded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A stack of one module's own, for modules that reload the broker (a revocation sends
    Mosquitto SIGHUP). Mosquitto 2.0 re-checks every session at a reload and adds those that
    are offline to its session-expiry list a second time; when such a session expires, the
    entry left behind expires whatever new client later gets its memory, at random, about a
    second after it connects. The shared ``stack`` must never get a reload. Override ``stack``
    in such a module with a module fixture returning this one."""
    with running_stack(tmp_path_factory.mktemp("stack")) as info:
        yield info


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    with running_stack(tmp_path_factory.mktemp("stack")) as info:
        yield info
