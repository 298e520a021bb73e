"""The SLURM / local launcher configs: job shape tied to the trainer, mismatches refused
before anything is submitted. Fast: composes configs, never reaches a cluster."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import ROOT, run_train
# Used through the module: Hydra's plugin scan re-executes plugin modules in place, which
# replaces the exception class that a `from ... import` would have kept.
import hydra_plugins.tokbench_launchers.launchers as launchers


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("launcher", ["slurm", "local"])
@pytest.mark.parametrize("overrides, devices, nodes", [
    (["trainer=ddp_cpu"], 2, 1),
    (["trainer=cpu"], 1, 1),
    (["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"], 8, 4),
    (["trainer=ddp", "trainer.devices=4"], 4, 1),
    (["trainer=gpu"], 1, 1),
])
def test_composed_launcher_takes_its_shape_from_the_trainer(launcher, overrides, devices, nodes):
    cfg = _compose([f"hydra/launcher={launcher}", *overrides])
    assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices == devices
    assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes == nodes


def test_slurm_launcher_passes_cluster_keys_through_from_one_file():
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu",
                    "hydra.launcher.account=proj42", "hydra.launcher.qos=high", "hydra.launcher.constraint=a100",
                    "+hydra.launcher.additional_parameters.mail-type=END"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert (launcher["partition"], launcher["account"], launcher["qos"], launcher["constraint"]) == (
        "gpu", "proj42", "high", "a100")
    assert launcher["additional_parameters"] == {"requeue": True, "mail-type": "END"}
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0


def test_gpus_per_node_auto_requests_one_gpu_per_device_and_none_on_cpu():
    tied = {"tasks_per_node": 8, "nodes": 2, "gpus_per_node": "auto"}
    assert launchers.job_shape(tied, {"accelerator": "gpu", "devices": 8, "num_nodes": 2})["gpus_per_node"] == 8
    assert launchers.job_shape({**tied, "tasks_per_node": 2, "nodes": 1},
                     {"accelerator": "cpu", "devices": 2, "num_nodes": 1})["gpus_per_node"] is None


def test_tasks_per_node_different_from_devices_is_refused_with_the_fix():
    with pytest.raises(launchers.LauncherConfigError, match=r"tasks_per_node=4 but trainer.devices=2.*Fix:"):
        launchers.job_shape({"tasks_per_node": 4, "nodes": 1}, {"accelerator": "cpu", "devices": 2, "num_nodes": 1})


def test_nodes_different_from_num_nodes_is_refused_with_the_fix():
    with pytest.raises(launchers.LauncherConfigError, match=r"nodes=1 but trainer.num_nodes=4.*Fix:"):
        launchers.job_shape({"tasks_per_node": 8, "nodes": 1}, {"accelerator": "gpu", "devices": 8, "num_nodes": 4})


def test_devices_auto_cannot_size_a_job():
    with pytest.raises(launchers.LauncherConfigError, match=r"trainer.devices='auto'.*explicit count"):
        launchers.job_shape({"tasks_per_node": 1, "nodes": 1}, {"devices": "auto", "num_nodes": 1})


def test_fewer_gpus_than_devices_is_refused():
    with pytest.raises(launchers.LauncherConfigError, match=r"gpus_per_node=2 but trainer.devices=8"):
        launchers.job_shape({"tasks_per_node": 8, "nodes": 1, "gpus_per_node": 2}, {"accelerator": "gpu", "devices": 8})


# The refusal through the real entry point: train.py -m exits before submitting. An
# unknown partition makes a wrongly accepted sweep fail at sbatch instead of running.
@pytest.mark.parametrize("overrides, message", [
    (["hydra.launcher.tasks_per_node=3"], "hydra.launcher.tasks_per_node=3 but trainer.devices=2"),
    (["trainer.devices=1,2"], "hydra.launcher.tasks_per_node=2 but trainer.devices=1"),
])
def test_mismatched_sweep_is_refused_before_submission(tmp_path, overrides, message):
    p = run_train(["-m", "hydra/launcher=slurm", "trainer=ddp_cpu", "debug=smoke",
                   "hydra.launcher.partition=no_such_partition_for_tests", *overrides],
                  env={"TOKBENCH_ROOT": str(tmp_path)}, timeout=120)
    assert p.returncode != 0
    assert message in p.stderr + p.stdout
    assert not list(tmp_path.rglob(".submitit")), "a job folder was written: something was submitted"
