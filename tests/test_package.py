"""The package namespace: public submodules are attributes, imported on first use.

Run in a fresh interpreter: in this test session other tests have imported every
submodule already, which would hide both a missing attribute and a lost laziness.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import recon

PACKAGE = Path(recon.__file__).parent
PUBLIC = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))

PROBE = """
import json, sys
import recon
lazy = {m: f"recon.{m}" in sys.modules for m in ("models", "plans", "data", "finetune")}
model = recon.models.pretrained("vgg16_fmnist")
found = {m: type(getattr(recon, m)).__name__ for m in sorted(dir(recon)) if m in PUBLIC}
try:
    recon.no_such_module
    missing = "no error"
except AttributeError as exc:
    missing = str(exc)
try:
    recon._default
    private = "no error"
except AttributeError as exc:
    private = str(exc)
print(json.dumps({
    "loaded_at_import": lazy,
    "model": type(model).__name__,
    "plans": recon.plans.names()[:1],
    "found": found,
    "dir": dir(recon),
    "missing": missing,
    "private": private,
}))
"""


def _probe() -> dict:
    code = f"PUBLIC = {PUBLIC!r}\n{PROBE}"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_public_submodules_are_lazy_attributes():
    got = _probe()
    # `import recon` does not load the model zoo, the plans, the data or fine-tuning ...
    assert got["loaded_at_import"] == dict.fromkeys(("models", "plans", "data", "finetune"), False)
    # ... yet each is an attribute, as torchvision.models is after `import torchvision`
    assert got["model"] == "VGG"
    assert got["plans"]
    assert got["found"] == dict.fromkeys(PUBLIC, "module")
    assert set(PUBLIC) <= set(got["dir"])
    assert {"prune", "PruneResult", "Report", "load", "save"} <= set(got["dir"])
    # other names still fail as on any module; private modules are not served
    assert got["missing"] == "module 'recon' has no attribute 'no_such_module'"
    assert got["private"] == "module 'recon' has no attribute '_default'"
