"""Evaluate tokenizer checkpoints (and latent generators) and write a comparison report.

    python evaluate.py checkpoints=[RUN_A,RUN_B/checkpoints/last.ckpt] data=imagenet \
        data.root=/datasets/imagenet-wds out=reports/cmp [fabric.devices=8] [debug=smoke]

Configuration: conf/evaluate/evaluate.yaml. The work happens in ``evaluation.main``.
"""
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf/evaluate", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from evaluation.main import CheckpointsNotEvaluated, main as run

    try:
        run(cfg)
    except CheckpointsNotEvaluated as error:  # the others' report is written; name the bad ones, no traceback
        sys.stderr.write(f"Error: {error}\n")
        raise SystemExit(1)


if __name__ == "__main__":
    from pathlib import Path

    from training.preflight import check_overrides  # unknown keys: the closest real one, in a second

    check_overrides(Path(__file__).resolve().parent / "conf" / "evaluate", "evaluate", sys.argv[1:])
    main()
