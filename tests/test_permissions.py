"""State and secrets stay private: the SQLite store is made 0600 in a 0700 directory,
and a store or a config holding a password that every user can read is named."""

import logging
import os
import stat

from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.config import load_config
from wattkeeper.store.db import make_engine

runner = CliRunner()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_store_and_its_directory_are_private_whatever_the_umask(tmp_path):
    path = tmp_path / "state" / "sub" / "wattkeeper.db"
    old = os.umask(0o022)
    try:
        r = runner.invoke(
            app,
            [
                "run",
                "--simulate",
                "1x2",
                "--duration",
                "10s",
                "--fast",
                "--db",
                f"sqlite:///{path}",
            ],
        )
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600
    for side in path.parent.glob("wattkeeper.db-*"):  # WAL and shared memory, if left
        assert mode(side) & 0o077 == 0, side


def test_an_existing_store_keeps_its_mode_and_a_readable_one_is_named_once(tmp_path, caplog):
    path = tmp_path / "shared.db"
    path.touch()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        make_engine(f"sqlite:///{path}")
        make_engine(f"sqlite:///{path}")
    assert mode(path) == 0o644  # the owner's choice is not changed behind their back
    said = [r.getMessage() for r in caplog.records if "readable by every local user" in r.message]
    assert len(said) == 1 and f"chmod 600 {path}" in said[0]


def test_a_private_store_says_nothing(tmp_path, caplog):
    path = tmp_path / "private.db"
    with caplog.at_level(logging.WARNING):
        make_engine(f"sqlite:///{path}")
    assert mode(path) == 0o600
    assert not [r for r in caplog.records if "readable" in r.getMessage()]


def _config(tmp_path, url: str, file_mode: int):
    path = tmp_path / "wattkeeper.toml"
    path.write_text(f'[store]\nurl = "{url}"\n', encoding="utf-8")
    path.chmod(file_mode)
    return path


def test_a_config_with_a_password_that_others_can_read_is_warned_about(tmp_path, caplog):
    path = _config(tmp_path, "postgresql+psycopg://wk:s3cret@db.example:5432/wk", 0o644)
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path, environ={})
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "holds a password" in said and f"chmod 600 {path}" in said
    assert "s3cret" not in said
    assert cfg.store.url.endswith("/wk")  # a warning only: the config still loads


def test_no_warning_for_a_private_file_or_one_without_a_password(tmp_path, caplog):
    private = _config(tmp_path, "postgresql+psycopg://wk:s3cret@db.example:5432/wk", 0o600)
    with caplog.at_level(logging.WARNING):
        load_config(private, environ={})
        public = _config(tmp_path, "postgresql+psycopg://wk@db.example:5432/wk", 0o644)
        load_config(public, environ={})
    assert not [r for r in caplog.records if "password" in r.getMessage()]
