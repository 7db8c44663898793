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
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"code": code.returncode, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
                      "cpu_s": usage.ru_utime + usage.ru_stime, "stderr": code.stderr[-2000:]}))
    """
)


def measure(command: list[str]) -> dict:
    """Run `command` and return {"code", "wall_s", "peak_rss_mib", "cpu_s" (user + system seconds of all its
    threads and children), "stderr" (its last 2000 characters)}.

    Raises:
        subprocess.CalledProcessError: the wrapper itself failed (not the command, whose code is returned).
    """
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)
