"""The write spool on a real SQLite file in tmp_path: first in, first out, durable across a
reopen, bounded by its cap, one process at a time, and small again once drained."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleet_server.batcher import SpoolDepth, SpoolError
from fleet_server.spool import Spool


def batch(n: int, size: int = 10) -> bytes:
    return f"b{n}".encode().ljust(size, b".")


@pytest.mark.asyncio
async def test_batches_come_back_oldest_first_in_runs_of_at_most_max_points(
    tmp_path: Path,
) -> None:
    async with Spool(tmp_path / "spool.sqlite3", 10_000) as spool:
        assert await spool.head(100) is None
        for n, points in [(1, 3), (2, 3), (3, 5), (4, 1)]:
            await spool.append(batch(n), points)
        assert spool.depth == SpoolDepth(batches=4, points=12, bytes=40)

        run = await spool.head(6)
        assert run is not None
        assert (run.batches, run.points, run.body) == (2, 6, batch(1) + b"\n" + batch(2))
        # Reading is not consuming: until dropped, the same run comes back.
        assert await spool.head(6) == run
        await spool.drop(run)
        assert spool.depth == SpoolDepth(batches=2, points=6, bytes=20)

        # A batch bigger than max_points still comes out, alone.
        run = await spool.head(2)
        assert run is not None
        assert (run.batches, run.points, run.body) == (1, 5, batch(3))
        await spool.drop(run)
        await spool.append(batch(5), 2)
        run = await spool.head(100)
        assert run is not None
        assert run.body == batch(4) + b"\n" + batch(5)
        await spool.drop(run)
        assert spool.depth == SpoolDepth(0, 0, 0)
        assert await spool.head(100) is None


@pytest.mark.asyncio
async def test_a_drop_removes_only_what_the_run_read(tmp_path: Path) -> None:
    async with Spool(tmp_path / "spool.sqlite3", 10_000) as spool:
        await spool.append(batch(1), 1)
        run = await spool.head(100)
        assert run is not None
        await spool.append(batch(2), 1)  # appended while the run was being written
        await spool.drop(run)
        assert spool.depth == SpoolDepth(1, 1, 10)
        left = await spool.head(100)
        assert left is not None
        assert left.body == batch(2)


@pytest.mark.asyncio
async def test_what_was_appended_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "spool.sqlite3"  # the directory is made on open
    async with Spool(path, 10_000) as spool:
        for n in range(1, 4):
            await spool.append(batch(n), n)
        run = await spool.head(1)
        assert run is not None
        await spool.drop(run)

    async with Spool(path, 10_000) as spool:
        assert spool.depth == SpoolDepth(batches=2, points=5, bytes=20)
        run = await spool.head(100)
        assert run is not None
        assert run.body == batch(2) + b"\n" + batch(3)


@pytest.mark.asyncio
async def test_room_is_counted_in_bytes_of_line_protocol(tmp_path: Path) -> None:
    async with Spool(tmp_path / "spool.sqlite3", 25) as spool:
        assert spool.has_room(25)
        assert not spool.has_room(26)
        await spool.append(batch(1), 1)
        await spool.append(batch(2), 1)
        assert spool.has_room(5)
        assert not spool.has_room(6)
        run = await spool.head(1)
        assert run is not None
        await spool.drop(run)
        assert spool.has_room(15)


@pytest.mark.asyncio
async def test_a_drained_spool_gives_its_disk_space_back(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    async with Spool(path, 100_000_000) as spool:
        for n in range(200):
            await spool.append(batch(n, 50_000), 100)
        assert path.stat().st_size > 5_000_000
        while (run := await spool.head(1000)) is not None:
            await spool.drop(run)
        assert path.stat().st_size < 1_000_000


@pytest.mark.asyncio
async def test_a_spool_in_use_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    async with Spool(path, 10_000) as spool:
        await spool.append(batch(1), 1)
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    f"""
                    import asyncio, sys
                    from pathlib import Path
                    from fleet_server.spool import Spool
                    from fleet_server.batcher import SpoolError

                    async def main() -> None:
                        try:
                            async with Spool(Path({str(path)!r}), 10_000):
                                print("opened")
                        except SpoolError as exc:
                            print(exc)

                    asyncio.run(main())
                    """
                ),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "in use by another fleet-server process" in other.stdout
        assert "spool_path" in other.stdout
        assert spool.depth.batches == 1


@pytest.mark.asyncio
async def test_a_spool_that_cannot_be_created_says_where(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(SpoolError, match="not-a-dir"):
        async with Spool(blocker / "spool.sqlite3", 10_000):
            pass
