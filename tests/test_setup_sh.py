"""scripts/setup.sh's repeat call and its record of the torch the extension
was built against, offline (the fixture of tests/test_gpu_check.py: a copy of
the setup files, a failing pip, a recording build). Each full run of setup.sh
imports every optional package (about 20 s here): two full runs in all."""
from __future__ import annotations

import torch
from test_gpu_check import offline  # noqa: F401 - the fixture


def test_repeat_call_is_a_no_op_and_a_torch_change_rebuilds(offline):  # noqa: F811
    p = offline.run()
    assert p.returncode == 0, p.stderr
    record = offline.root / "build" / "_C.torch"
    assert record.exists(), p.stderr
    assert record.read_text().strip() == torch.__version__   # found importing: this torch's
    assert (offline.root / "build" / "setup.stamp").exists()

    p = offline.run()
    assert p.returncode == 0, p.stderr
    assert "nothing changed" in p.stderr
    assert offline.pip_calls == [] and offline.builds == []

    record.write_text("2.11.0+cu130\n")                  # as if built against another torch
    p = offline.run()
    assert p.returncode == 0, p.stderr
    assert "nothing changed" not in p.stderr
    assert offline.builds == ["setup.py build_ext --inplace"]
    assert f"built against torch 2.11.0+cu130, torch is now {torch.__version__}" in p.stderr
    assert record.read_text().strip() == torch.__version__

    p = offline.run()                                    # the stamp follows the rebuild
    assert "nothing changed" in p.stderr and offline.builds == ["setup.py build_ext --inplace"]
