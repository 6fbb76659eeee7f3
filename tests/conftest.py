"""Test configuration.

Eight virtual CPU devices are requested before JAX is imported, so sharding tests can split a batch over
them; everything else runs on the default (first) device as usual. The experiment scripts started by the tests
use a compilation cache of this test run's own (``JAXDIFF_COMPILATION_CACHE``).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The experiment scripts the tests start share one compilation cache per test run (both workers of
# ``pytest -n 2``), never the user's own.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault(
    "JAXDIFF_COMPILATION_CACHE",
    os.path.join(tempfile.gettempdir(), f"jaxdiff-xla-{_run}") if _run else tempfile.mkdtemp(prefix="jaxdiff-xla-"),
)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
