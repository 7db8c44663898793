"""Wall time and peak RSS of a command, measured as the only child of a small wrapper process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# The wrapper's RUSAGE_CHILDREN max RSS is the command's own peak (file-backed pages included),
# untouched by the memory of the benchmark script that starts it.
MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"code": code.returncode, "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
                      "stderr": code.stderr[-2000:]}))
    """
)


def measure(command: list[str]) -> dict:
    """Run `command` and return {"code", "wall_s", "peak_rss_mib", "stderr" (its last 2000 characters)}.

    Raises:
        subprocess.CalledProcessError: the wrapper itself failed (not the command, whose code is returned).
    """
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)
