"""Test configuration.

Eight virtual CPU devices are requested before JAX is imported, so sharding tests can split a batch over
them; everything else runs on the default (first) device as usual.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
