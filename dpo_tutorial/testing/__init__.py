"""Test support, not part of what a run uses: ``dpo-tutorial train`` and the notebooks never import it.

- ``fixtures``: tiny random-weight SD / SDXL / PickScore stand-ins in exactly the real formats, for tests and
  benchmarks (no download);
- ``device_guard``: a CPU-only check that every tensor reaches its model's device, for the tests that run the
  notebooks' GPU cells on a CPU.
"""
