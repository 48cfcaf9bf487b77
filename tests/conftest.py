"""Shared fixtures: a real tiny run (stdlib pydoc topics through every stage), built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmforge import pipeline
from lmforge.config import load_recipe


def tiny_recipe(**overrides):
    return load_recipe("tiny", overrides)


@pytest.fixture(scope="session")
def prepared_workdir(tmp_path_factory) -> Path:
    """data, tokenizer and tokens of the tiny recipe (no training), built once."""
    workdir = tmp_path_factory.mktemp("prepared")
    recipe = tiny_recipe()
    layout = pipeline.layout_for(recipe, workdir)
    for stage in ("data", "tokenizer", "tokens"):
        pipeline.RUNNERS[stage](recipe, layout, progress=False)
    return workdir


@pytest.fixture
def prepared_run(prepared_workdir, tmp_path) -> Path:
    """A private copy of the prepared tiny run folder, ready for `pretrain`."""
    destination = tmp_path / "runs"
    shutil.copytree(prepared_workdir, destination)
    return destination


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, prepared_workdir) -> Path:
    """The tiny recipe trained and evaluated (read-only for tests: copy before changing it)."""
    workdir = tmp_path_factory.mktemp("trained")
    shutil.copytree(prepared_workdir, workdir, dirs_exist_ok=True)
    recipe = tiny_recipe()
    layout = pipeline.layout_for(recipe, workdir)
    pipeline.run_all(recipe, layout, progress=False)
    return layout.root


@pytest.fixture
def browser():
    """A headless Debian Chromium driven by selenium (browser test modules skip first where either is missing)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # Headless, and nothing that would reach for the network on a closed machine.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in the test process, as in any Python started from a terminal.

    A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored: the tests that
    stop a server the way a user does (Ctrl-C, simulated with ``_thread.interrupt_main``) would wait forever.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
