"""XLA flags for simulated CPU devices in tests (imported before jax: no jax import here).

XLA's CPU collectives abort the whole process (SIGABRT, "Termination timeout ... of 40 seconds exceeded") when one
simulated device reaches a collective more than 40 s after the others. On CI's 2 cores, with the learning test's two
training processes beside a worker's 8-device program, a device thread can be starved that long: the worker dies
and pytest-xdist reports it crashed (CI of stop 35). Tests give the collectives as long as a test may run
(pyproject's pytest timeout, 900 s) and more; a real hang is still stopped by that timeout."""

PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=3600")


def cpu_devices(n: int) -> str:
    """XLA_FLAGS for ``n`` simulated CPU devices whose collectives wait as long as a test may run."""
    return f"--xla_force_host_platform_device_count={n} {PATIENT_COLLECTIVES}"
