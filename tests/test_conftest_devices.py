import jax


def test_eight_virtual_devices():
    assert jax.device_count() == 8
