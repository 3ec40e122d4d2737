"""Shared fixtures: the AG News copy beside the repository, tiny model configs."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AG_NEWS_DIR = REPO.parent / "shared" / "data" / "ag_news"


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    """The local AG News copy (train.csv, test.csv); tests that need it skip without it."""
    if not (AG_NEWS_DIR / "train.csv").is_file():
        pytest.skip(f"AG News not found at {AG_NEWS_DIR}")
    return AG_NEWS_DIR
