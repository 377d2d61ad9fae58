"""dlrm-bench's measuring core; PROJECT_ROOT is the checkout that holds it."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
