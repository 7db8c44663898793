"""The package's public names: `upcycle.convert` and `upcycle.merge` are the functions, whatever loaded first."""

import subprocess
import sys


def test_public_functions_survive_their_submodules_being_imported_first():
    script = (
        "import upcycle.convert, upcycle.merge, sys\n"
        "from upcycle import convert, merge\n"
        "assert callable(convert) and convert.__name__ == 'convert', convert\n"
        "assert callable(merge) and merge.__name__ == 'merge', merge\n"
        "assert sys.modules['upcycle.convert'].ConvertSummary is upcycle.ConvertSummary\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_importing_the_package_does_not_import_torch():
    script = "import sys, upcycle, upcycle.errors\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    subprocess.run([sys.executable, "-c", script], check=True)
