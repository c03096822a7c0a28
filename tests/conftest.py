import os
from pathlib import Path

import pytest

# Kernels chosen by measurement (core.choice) could differ between the test's processes where two candidates are
# close; the suite runs the default kernels everywhere, and tests/test_kernel_choice.py tests the choosing.
os.environ.setdefault("OPTQ_KERNELS", "default")

# The fixtures live in ../shared/data beside the repository (OPTQ_SHARED overrides the ../shared folder).
SHARED = Path(os.environ.get("OPTQ_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: the tests read the fixtures in ../shared/data next to the repo")
    return p


@pytest.fixture(scope="session")
def tinystories_model():
    return shared_path("models", "TinyStories-656K")


@pytest.fixture(scope="session")
def stories260k_model():
    return shared_path("models", "stories260K-hf")


@pytest.fixture(scope="session")
def tinystories_text():
    return shared_path("tinystories", "validation_100.txt")
