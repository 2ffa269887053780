"""``gatewayd run`` plus a dump of the store's group-commit counters at exit, for the benchmark.

Usage: python bench/daemon.py CONFIG STATS_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from gatewayd import config as config_module
from gatewayd import logs
from gatewayd.daemon import Daemon


def main(config_path: str, stats_path: str) -> int:
    config = config_module.load(Path(config_path))
    logs.configure(config.logging)
    daemon = Daemon(config)
    asyncio.run(daemon.run())
    assert daemon.store is not None
    stats = daemon.store.stats
    Path(stats_path).write_text(json.dumps({"jobs": stats.jobs, "commits": stats.commits}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
