"""A merge imports its dense config class while the tensors stream (`import_config_class_in_background`): the
class is imported on another thread, and a model type transformers does not know raises nothing there."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from upcycle.families.configs import import_config_class_in_background

    module = "transformers.models.mistral.configuration_mistral"
    assert module not in sys.modules
    import_config_class_in_background("no_such_model_type")
    import_config_class_in_background("mistral")
    assert threading.current_thread() is threading.main_thread()
    deadline = time.monotonic() + 120
    while module not in sys.modules or any(t.name == "upcycle-config-import" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the config class was never imported"
        time.sleep(0.05)
    from transformers import AutoConfig
    print(type(AutoConfig.for_model("mistral")).__name__)
    """
)


def test_the_config_class_is_imported_on_a_thread_and_an_unknown_type_raises_nothing():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MistralConfig"
    assert "Traceback" not in result.stderr
