"""Nothing in the package may unpickle: weights are safetensors, every other piece of state is JSON."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"


def test_no_pickle_loading_in_the_package():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|\bjoblib\.load\(", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_the_scan_catches_what_it_looks_for(tmp_path):
    # Guard against a scan that can never fail: the patterns must match the forbidden calls.
    assert re.search(r"\bpickle\.loads?\(", "state = pickle.load(handle)")
    assert re.search(r"\btorch\.load\(", "torch.load(path)")
