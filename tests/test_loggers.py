"""W&B decides online/offline by itself, and a run directory keeps one W&B run id."""
import pytest

from common import loggers


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandbcfg"))
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_without_credentials_wandb_goes_offline(no_credentials):
    assert loggers.wandb_mode() == "offline"


def test_an_api_key_in_netrc_means_online(no_credentials):
    (no_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (no_credentials / ".netrc").chmod(0o600)
    assert loggers.wandb_mode() == "online"


def test_wandb_mode_set_by_the_user_wins(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode() == "disabled"


def test_run_id_is_created_once_and_reused(tmp_path):
    first = loggers.persistent_run_id(tmp_path)
    assert loggers.persistent_run_id(tmp_path) == first
    assert (tmp_path / "wandb_run_id.txt").read_text() == first


def test_a_run_without_credentials_logs_offline_with_a_notice(tmp_path, monkeypatch, caplog):
    from inprocess import train_in_process

    run = tmp_path / "run"
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    with caplog.at_level("WARNING"):
        train_in_process(run, ["logger=wandb", "trainer.max_steps=2"])  # train.py's train(), in this process
    assert "logging offline" in caplog.text
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    files = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files and files[0].stat().st_size > 0
