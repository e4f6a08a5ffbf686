"""Fixtures shared by every test tier.

``stack`` starts real Mosquitto, InfluxDB and the SMTP sink once per test session, in a
temporary work dir on free loopback ports, and stops them at the end. Nothing a test uses may
already be running on the machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.stack import StackInfo, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    with running_stack(tmp_path_factory.mktemp("stack")) as info:
        yield info
